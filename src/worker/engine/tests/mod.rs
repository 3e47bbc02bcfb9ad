//! The script suite (suite.rs), once per engine: the same tests, word for word, hold each
//! backend to the same script API.

mod quickjs {
    const ENGINE: crate::wire::EngineKind = crate::wire::EngineKind::Quickjs;
    include!("suite.rs");
}

#[cfg(any(feature = "deno", feature = "v8"))]
mod deno {
    const ENGINE: crate::wire::EngineKind = crate::wire::EngineKind::Deno;
    include!("suite.rs");
}
