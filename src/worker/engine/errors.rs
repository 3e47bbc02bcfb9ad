//! Turning what QuickJS throws (through rquickjs) into the [`ScriptError`] the gateway and clients see.

use rquickjs::CaughtError;

pub(super) use super::classify_message;
use super::{timeout_error, CpuBudget};
use crate::wire::{ScriptError, ScriptErrorKind};

pub(super) fn to_script_error(error: CaughtError<'_>, budget: &CpuBudget) -> ScriptError {
    if budget.exceeded.get() {
        return timeout_error(budget.limit);
    }
    match error {
        CaughtError::Exception(exception) => {
            let message = exception.message().unwrap_or_else(|| "exception".to_owned());
            let kind = classify_message(&message);
            let name: Option<String> = exception.get("name").ok();
            let message = match name {
                Some(name) if !name.is_empty() => format!("{name}: {message}"),
                _ => message,
            };
            ScriptError { kind, message, stack: exception.stack() }
        }
        CaughtError::Value(value) => ScriptError::exception(describe_value(&value)),
        CaughtError::Error(rquickjs::Error::Allocation) => ScriptError {
            kind: ScriptErrorKind::OutOfMemory,
            message: "out of memory".to_owned(),
            stack: None,
        },
        CaughtError::Error(other) => ScriptError::exception(other.to_string()),
    }
}

/// Start-up errors are read by whoever fixes the script: name the error and where it is,
/// e.g. `SyntaxError: unexpected token in expression: ')' (at room.js:3:14)`.
pub(super) fn with_location(mut error: ScriptError) -> ScriptError {
    let location = error
        .stack
        .as_deref()
        .and_then(|stack| stack.lines().map(str::trim).find_map(|line| line.strip_prefix("at ")));
    if let Some(location) = location {
        error.message = format!("{} (at {location})", error.message);
    }
    error
}

pub(super) fn script_error_from_value(value: &rquickjs::Value<'_>, budget: &CpuBudget) -> ScriptError {
    if budget.exceeded.get() {
        return timeout_error(budget.limit);
    }
    let message = describe_value(value);
    let stack =
        value.as_object().and_then(|o| rquickjs::Exception::from_object(o.clone())).and_then(|e| e.stack());
    ScriptError { kind: classify_message(&message), message, stack }
}

pub(super) fn describe_value(value: &rquickjs::Value<'_>) -> String {
    if let Some(exception) = value.as_object().and_then(|o| rquickjs::Exception::from_object(o.clone())) {
        return exception.message().unwrap_or_else(|| "exception".to_owned());
    }
    if let Some(s) = value.as_string().and_then(|s| s.to_string().ok()) {
        return s;
    }
    value
        .ctx()
        .json_stringify(value.clone())
        .ok()
        .flatten()
        .and_then(|s| s.to_string().ok())
        .unwrap_or_else(|| format!("{:?}", value.type_of()))
}
