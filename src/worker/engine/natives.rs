//! The natives the prelude builds the script API on: each forwards to the [`Host`].

use std::rc::Rc;

use rquickjs::{Ctx, Function, Object};

use super::errors::classify_message;
use super::Host;
use crate::wire::{LogLevel, ScriptError, ScriptErrorKind};

/// The natives the prelude builds the script API on. They are passed to the prelude, never
/// installed as globals.
pub(super) fn natives<'js>(ctx: &Ctx<'js>, host: Rc<dyn Host>) -> rquickjs::Result<Object<'js>> {
    let natives = Object::new(ctx.clone())?;

    let h = host.clone();
    natives.set(
        "hostCallSync",
        Function::new(ctx.clone(), move |ctx: Ctx<'js>, name: String, args: String| {
            h.host_call_sync(&name, &args)
                .map_err(|message| rquickjs::Exception::throw_message(&ctx, &message))
        })?,
    )?;
    let h = host.clone();
    natives.set(
        "hostCallAsync",
        Function::new(ctx.clone(), move |name: String, args: String| h.host_call_async(&name, &args) as f64)?,
    )?;
    let h = host.clone();
    natives.set(
        "post",
        Function::new(ctx.clone(), move |channel: String, data: String| h.post(&channel, &data))?,
    )?;
    let h = host.clone();
    natives.set(
        "push",
        Function::new(ctx.clone(), move |conn: String, event: String, payload: String| {
            h.push(&conn, &event, &payload)
        })?,
    )?;
    let h = host.clone();
    natives.set(
        "broadcast",
        Function::new(ctx.clone(), move |event: String, payload: String, except: Vec<String>| {
            h.broadcast(&event, &payload, except)
        })?,
    )?;
    let h = host.clone();
    natives.set(
        "track",
        Function::new(ctx.clone(), move |conn: String, key: String, meta: String| {
            h.track(&conn, &key, &meta)
        })?,
    )?;
    let h = host.clone();
    natives.set("untrack", Function::new(ctx.clone(), move |conn: String| h.untrack(&conn))?)?;
    let h = host.clone();
    natives.set("subscribe", Function::new(ctx.clone(), move |channel: String| h.subscribe(&channel))?)?;
    let h = host.clone();
    natives
        .set("unsubscribe", Function::new(ctx.clone(), move |channel: String| h.unsubscribe(&channel))?)?;
    let h = host.clone();
    natives.set(
        "log",
        Function::new(ctx.clone(), move |level: String, message: String| {
            let level = match level.as_str() {
                "debug" => LogLevel::Debug,
                "warn" => LogLevel::Warn,
                "error" => LogLevel::Error,
                _ => LogLevel::Info,
            };
            h.log(level, &message)
        })?,
    )?;
    let h = host.clone();
    natives.set(
        "storagePut",
        Function::new(ctx.clone(), move |ctx: Ctx<'js>, key: String, json: String, stored: f64| {
            h.storage_put(&key, &json, stored as u64)
                .map_err(|message| rquickjs::Exception::throw_range(&ctx, &message))
        })?,
    )?;
    let h = host.clone();
    natives.set(
        "storageDelete",
        Function::new(ctx.clone(), move |key: String, stored: f64| h.storage_delete(&key, stored as u64))?,
    )?;
    let h = host.clone();
    natives.set(
        "setAlarm",
        Function::new(ctx.clone(), move |at: f64| h.set_alarm((at >= 0.0).then_some(at as u64)))?,
    )?;
    let h = host.clone();
    natives.set(
        "replyOk",
        Function::new(ctx.clone(), move |id: f64, json: String| h.reply(id as u64, Ok(json)))?,
    )?;
    let h = host;
    natives.set(
        "replyError",
        Function::new(ctx.clone(), move |id: f64, message: String, stack: String, kind: String| {
            let kind = match kind.as_str() {
                "refused" => ScriptErrorKind::Refused,
                "unknown_connection" => ScriptErrorKind::UnknownConnection,
                _ => classify_message(&message),
            };
            let stack = (!stack.is_empty()).then_some(stack);
            h.reply(id as u64, Err(ScriptError { kind, message, stack }))
        })?,
    )?;
    Ok(natives)
}
