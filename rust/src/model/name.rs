//! [`Name`]: a Kubernetes name that is safe to print into rule text.

use serde::Deserialize;
use std::fmt;

/// A lower-case DNS label (RFC 1123: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 bytes), or
/// empty. Namespaces, Service names and port names are all of this form in a valid cluster,
/// so restricting them to it means no quote, space, newline or option can reach a rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Name(String);

impl Name {
    pub const MAX_LEN: usize = 63;

    pub fn new(s: &str) -> Result<Name, String> {
        Name::try_from(s.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<String> for Name {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let bytes = s.as_bytes();
        let ok_char = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
        let valid = s.is_empty()
            || (bytes.len() <= Name::MAX_LEN
                && bytes.iter().all(ok_char)
                && bytes[0] != b'-'
                && bytes[bytes.len() - 1] != b'-');
        if valid {
            Ok(Name(s))
        } else {
            Err(format!("{s:?} is not a DNS label"))
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["", "a", "kube-dns", "x1", &"a".repeat(63)] {
            assert!(Name::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_anything_that_could_change_a_rule() {
        for bad in [
            "A",
            "-a",
            "a-",
            "a b",
            "a\"b",
            "a\nb",
            "-A",
            "a.b",
            &"a".repeat(64),
        ] {
            assert!(Name::new(bad).is_err(), "{bad:?}");
        }
    }
}
