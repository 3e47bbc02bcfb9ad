//! The script suite (suite.rs), on the engine of this build: the same tests, word for word,
//! hold each backend to the same script API (`cargo test` runs them on QuickJS, `cargo test
//! --features deno` on deno_core).

#[cfg(not(any(feature = "deno", feature = "v8")))]
mod quickjs {
    const ENGINE: crate::wire::EngineKind = crate::wire::EngineKind::Quickjs;
    include!("suite.rs");
}

#[cfg(any(feature = "deno", feature = "v8"))]
mod deno {
    const ENGINE: crate::wire::EngineKind = crate::wire::EngineKind::Deno;
    include!("suite.rs");
}
