//! How frames are laid on the pipe: a `u32` big-endian length prefix (tokio-util's
//! `LengthDelimitedCodec`) and a bincode body holding one enum value. The same codec serves
//! the gateway's async pipes and the worker's blocking ones.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use super::frames::{FromWorker, ToWorker};

#[derive(Debug)]
pub enum CodecError {
    Io(std::io::Error),
    Decode(bincode::error::DecodeError),
    Encode(bincode::error::EncodeError),
    /// A frame decoded but left bytes behind: the two sides disagree on the format.
    TrailingBytes(usize),
}

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CodecError::Io(e) => write!(f, "i/o: {e}"),
            CodecError::Decode(e) => write!(f, "undecodable frame: {e}"),
            CodecError::Encode(e) => write!(f, "unencodable frame: {e}"),
            CodecError::TrailingBytes(n) => write!(f, "frame has {n} trailing bytes"),
        }
    }
}

impl std::error::Error for CodecError {}

impl From<std::io::Error> for CodecError {
    fn from(e: std::io::Error) -> Self {
        CodecError::Io(e)
    }
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub fn encode<T: Serialize>(frame: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(frame, bincode_config()).map_err(CodecError::Encode)
}

pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, CodecError> {
    let (value, used) =
        bincode::serde::decode_from_slice(body, bincode_config()).map_err(CodecError::Decode)?;
    if used != body.len() {
        return Err(CodecError::TrailingBytes(body.len() - used));
    }
    Ok(value)
}

/// The length-prefix framing both sides use. The size cap is enforced while decoding, so an
/// oversize length prefix is rejected before its body is buffered.
pub fn length_codec(max_frame_bytes: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .big_endian()
        .max_frame_length(max_frame_bytes)
        .new_codec()
}

/// Typed frames over [`length_codec`], for `FramedRead`/`FramedWrite` and for the worker's
/// blocking I/O alike.
pub struct FrameCodec<In, Out> {
    framing: LengthDelimitedCodec,
    _types: std::marker::PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameCodec { framing: length_codec(max_frame_bytes), _types: std::marker::PhantomData }
    }
}

impl<In: for<'de> Deserialize<'de>, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        match self.framing.decode(src)? {
            Some(body) => decode(&body).map(Some),
            None => Ok(None),
        }
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        let body = encode(&item)?;
        self.framing.encode(Bytes::from(body), dst)?;
        Ok(())
    }
}

/// The gateway's side: reads `FromWorker`, writes `ToWorker`.
pub type GatewayCodec = FrameCodec<FromWorker, ToWorker>;
/// The worker's side: reads `ToWorker`, writes `FromWorker`.
pub type WorkerCodec = FrameCodec<ToWorker, FromWorker>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_the_codec() {
        let mut gateway = GatewayCodec::new(1024);
        let mut worker = WorkerCodec::new(1024);
        let mut wire = BytesMut::new();
        let call = ToWorker::Call { id: 7, function: "sendMessage".into(), args: r#"["ann","hi"]"#.into() };
        gateway.encode(call.clone(), &mut wire).unwrap();
        assert_eq!(worker.decode(&mut wire).unwrap(), Some(call));
        assert!(wire.is_empty());
    }

    #[test]
    fn oversize_length_prefix_is_rejected_before_buffering() {
        let mut worker = WorkerCodec::new(16);
        let mut wire = BytesMut::from(&[0u8, 0, 1, 0][..]);
        assert!(worker.decode(&mut wire).is_err());
    }

    #[test]
    fn garbage_body_is_a_decode_error() {
        let mut worker = WorkerCodec::new(1024);
        let mut wire = BytesMut::from(&[0u8, 0, 0, 3, 0xff, 0xff, 0xff][..]);
        assert!(matches!(worker.decode(&mut wire), Err(CodecError::Decode(_))));
    }
}
