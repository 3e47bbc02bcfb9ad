//! The chat application, as far as the gateway knows it: which functions of the room script a
//! join and a push call, the checks a `send_message` payload must pass first, and how the
//! script's answers become replies. The transport around it is application-agnostic.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::gateway::config::Config;

/// The one client event the chat answers.
pub const SEND_MESSAGE: &str = "send_message";
/// The script function a `send_message` push calls, with `[sender, text]`.
const SEND_MESSAGE_FUNCTION: &str = "sendMessage";
/// The script function a join calls, with `[history_on_join]`.
const HISTORY_FUNCTION: &str = "getHistory";

/// A call of the room script: which function, and its arguments as a JSON array.
#[derive(Debug, PartialEq, Eq)]
pub struct ScriptCall {
    pub function: &'static str,
    pub args_json: String,
}

/// The chat's rules, with the limits they are checked against.
#[derive(Debug, Clone)]
pub struct Chat {
    max_sender_chars: usize,
    max_text_chars: usize,
    history_on_join: usize,
}

impl Chat {
    pub fn new(config: &Config) -> Chat {
        Chat {
            max_sender_chars: config.max_sender_chars,
            max_text_chars: config.max_text_chars,
            history_on_join: config.history_on_join,
        }
    }

    /// What a join asks of the room: the latest messages.
    pub fn on_join(&self) -> ScriptCall {
        ScriptCall { function: HISTORY_FUNCTION, args_json: format!("[{}]", self.history_on_join) }
    }

    /// The join's reply, `{"messages": [...]}`, from the script's answer.
    pub fn join_reply(&self, history_json: &str) -> Result<Box<RawValue>, String> {
        RawValue::from_string(format!(r#"{{"messages":{history_json}}}"#))
            .map_err(|_| "the room returned a history that is not JSON".to_owned())
    }

    /// What a push asks of the room, or why it is refused before reaching the room.
    pub fn on_push(&self, event: &str, payload: &RawValue) -> Result<ScriptCall, String> {
        match event {
            SEND_MESSAGE => {
                let message = SendMessage::read(payload, self.max_sender_chars, self.max_text_chars)?;
                let args_json =
                    serde_json::to_string(&(message.sender, message.text)).map_err(|e| e.to_string())?;
                Ok(ScriptCall { function: SEND_MESSAGE_FUNCTION, args_json })
            }
            _ => Err("unknown event".to_owned()),
        }
    }

    /// The push's reply from the script's answer: the stored message.
    pub fn push_reply(&self, answer_json: String) -> Result<Box<RawValue>, String> {
        RawValue::from_string(answer_json)
            .map_err(|_| "the room returned a message that is not JSON".to_owned())
    }
}

/// The payload of a `send_message` push.
#[derive(Debug, Deserialize)]
pub struct SendMessage {
    pub sender: String,
    pub text: String,
}

impl SendMessage {
    /// Reads and checks the payload, or says why it is refused: it must be an object with a
    /// non-blank sender and text within their limits (in characters).
    pub fn read(
        payload: &RawValue,
        max_sender_chars: usize,
        max_text_chars: usize,
    ) -> Result<SendMessage, String> {
        let invalid = || "invalid payload: expected {\"sender\": string, \"text\": string}".to_owned();
        // serde would also read a struct from an array; the protocol's payloads are objects.
        if !payload.get().starts_with('{') {
            return Err(invalid());
        }
        let message: SendMessage = serde_json::from_str(payload.get()).map_err(|_| invalid())?;
        check_field("sender", &message.sender, max_sender_chars)?;
        check_field("text", &message.text, max_text_chars)?;
        Ok(message)
    }
}

fn check_field(name: &str, value: &str, max_chars: usize) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err(format!("{name} must not be blank"));
    }
    if value.chars().count() > max_chars {
        return Err(format!("{name} is longer than {max_chars} characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    #[test]
    fn fields_must_be_present_and_short() {
        assert!(check_field("text", "hi", 10).is_ok());
        assert_eq!(check_field("text", "  \n", 10).unwrap_err(), "text must not be blank");
        assert!(check_field("text", &"é".repeat(10), 10).is_ok(), "limits count characters, not bytes");
        assert!(check_field("text", &"é".repeat(11), 10).is_err());
    }

    #[test]
    fn a_send_message_push_calls_send_message_with_sender_and_text() {
        let chat = Chat::new(&Config::default());
        let call = chat.on_push(SEND_MESSAGE, &raw(r#"{"sender":"ann","text":"hi \"you\""}"#)).unwrap();
        assert_eq!(
            call,
            ScriptCall { function: "sendMessage", args_json: r#"["ann","hi \"you\""]"#.to_owned() }
        );
        assert_eq!(chat.on_push("shout", &raw("{}")).unwrap_err(), "unknown event");
        assert!(chat
            .on_push(SEND_MESSAGE, &raw(r#"["ann","hi"]"#))
            .unwrap_err()
            .starts_with("invalid payload"));
    }

    #[test]
    fn a_join_asks_for_the_configured_history() {
        let chat = Chat::new(&Config { history_on_join: 7, ..Config::default() });
        assert_eq!(chat.on_join(), ScriptCall { function: "getHistory", args_json: "[7]".to_owned() });
        assert_eq!(chat.join_reply("[1,2]").unwrap().get(), r#"{"messages":[1,2]}"#);
        assert!(chat.join_reply("[1,").is_err());
    }
}
