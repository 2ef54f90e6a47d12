//! The crate's one error type.

use thiserror::Error;

/// Everything that can go wrong in the core. Each variant says whether the caller should simply
/// retry or must make the next sync a full one ([`Error::needs_full_sync`]).
#[derive(Debug, Error)]
pub enum Error {
    /// The change set or configuration could not be decoded (a bug on the Python side, or a
    /// caller of the library API handing in malformed data).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A kernel tool (iptables-restore, iptables, ...) could not be started at all.
    #[error("{op}: cannot run {program}: {source}")]
    Spawn {
        op: &'static str,
        program: String,
        #[source]
        source: std::io::Error,
    },

    /// A kernel tool ran and reported failure. `stderr` is what it printed.
    #[error("{op} failed (exit code {code:?}): {stderr}")]
    Apply {
        op: &'static str,
        code: Option<i32>,
        stderr: String,
    },
}

impl Error {
    /// Whether what is in the kernel is now unknown, so the next sync must rewrite everything.
    pub fn needs_full_sync(&self) -> bool {
        match self {
            Error::InvalidInput(_) => false,
            Error::Spawn { .. } | Error::Apply { .. } => true,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
