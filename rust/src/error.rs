//! The crate's one error type.

use thiserror::Error;

/// Everything that can go wrong in the core. Each variant says whether the caller should simply
/// retry or must make the next sync a full one ([`Error::needs_full_sync`]). The Python classes
/// they map to (`rust/src/py/errors.rs`) carry the same fields.
#[derive(Debug, Error)]
pub enum Error {
    /// The change set or configuration could not be decoded (a bug on the Python side, or a
    /// caller of the library API handing in malformed data).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// The mode does not offer this operation (tracing the userspace mode's rules, say).
    #[error("{0}")]
    Unsupported(String),

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

    /// The kernel answered a netlink request with an error, or the netlink socket failed.
    /// `errno` is the kernel's (or the socket's) error number when there is one.
    #[error("{op}: {message}")]
    Netlink {
        op: &'static str,
        errno: Option<i32>,
        message: String,
    },

    /// The userspace forwarder could not start or serve (threads, sockets): not the input's
    /// fault, and not a kernel refusal of rules.
    #[error("{op}: {source}")]
    Forwarder {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether what is in the kernel is now unknown, so the next sync must rewrite everything.
    pub fn needs_full_sync(&self) -> bool {
        match self {
            Error::InvalidInput(_) | Error::Unsupported(_) => false,
            Error::Spawn { .. }
            | Error::Apply { .. }
            | Error::Netlink { .. }
            | Error::Forwarder { .. } => true,
        }
    }

    /// Whether the kernel (or its tool) refused what it was given: the refusals containment
    /// bisects by Service (a tool that cannot run, or input the core rejects, is not about
    /// any one Service).
    pub fn is_refusal(&self) -> bool {
        matches!(self, Error::Apply { .. } | Error::Netlink { .. })
    }
}

pub type Result<T> = std::result::Result<T, Error>;
