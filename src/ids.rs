//! Validated identifiers: user ids, session ids and owners.
//!
//! Every id that reaches a Graph URL or the store goes through one of these
//! constructors first. They are allow-lists, not deny-lists: anything that is
//! not plainly an object id or a userPrincipalName is refused.

use std::fmt;

use serde::{Serialize, Serializer};

/// Why an id was refused; the message names the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(pub String);

const MAX_USER_ID_LEN: usize = 256;
const MAX_OWNER_LEN: usize = 128;

/// A Graph user id: an object id (GUID) or a userPrincipalName, lower-cased.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

impl UserId {
    /// Validates `raw` against SPEC's allow-list and lower-cases it.
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        if raw.is_empty() {
            return Err(InvalidId("user id is empty".into()));
        }
        if raw.len() > MAX_USER_ID_LEN {
            return Err(InvalidId(format!(
                "user id is longer than {MAX_USER_ID_LEN} characters"
            )));
        }
        if let Some(c) = raw.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(InvalidId(format!(
                "user id contains whitespace or a control character ({:?})",
                c
            )));
        }
        if raw.contains("..") {
            return Err(InvalidId("user id contains \"..\"".into()));
        }
        if is_guid(raw) {
            return Ok(Self(raw.to_ascii_lowercase()));
        }
        let Some((local, domain)) = raw.rsplit_once('@') else {
            return Err(InvalidId(
                "user id is neither an object id (GUID) nor a userPrincipalName (local@domain)"
                    .into(),
            ));
        };
        if local.is_empty() {
            return Err(InvalidId("user id has an empty local part".into()));
        }
        if let Some(c) = local.chars().find(|&c| !is_upn_local_char(c)) {
            return Err(InvalidId(format!(
                "user id local part contains {c:?}, which a userPrincipalName cannot hold"
            )));
        }
        if domain.is_empty() || domain.starts_with('.') || domain.ends_with('.') {
            return Err(InvalidId("user id has an invalid domain".into()));
        }
        if let Some(c) = domain
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'))
        {
            return Err(InvalidId(format!(
                "user id domain contains {c:?}; only letters, digits, '.' and '-' are allowed"
            )));
        }
        Ok(Self(raw.to_ascii_lowercase()))
    }

    /// The id as stored and sent to Graph.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The characters SPEC allows in a UPN's local part (including guest `#EXT#`).
fn is_upn_local_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || ".-_+'!#$&*=^`{|}~".contains(c)
}

/// True for the canonical 8-4-4-4-12 hex form of a GUID.
pub fn is_guid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// A presence session id: a GUID (the application's id), lower-cased.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

impl SessionId {
    /// Accepts a GUID only.
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        if is_guid(raw) {
            Ok(Self(raw.to_ascii_lowercase()))
        } else {
            Err(InvalidId(
                "session id must be a GUID such as 22553876-f5ab-4529-bffb-cfe50aa89f87".into(),
            ))
        }
    }

    /// The id as stored and sent to Graph.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The label an app puts on its sessions, so it can clear just its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner(String);

impl Owner {
    /// Accepts 1 to 128 characters of `[A-Za-z0-9._:-]`.
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        if raw.is_empty() || raw.len() > MAX_OWNER_LEN {
            return Err(InvalidId(format!(
                "owner must be 1 to {MAX_OWNER_LEN} characters"
            )));
        }
        if let Some(c) = raw
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || "._:-".contains(c)))
        {
            return Err(InvalidId(format!(
                "owner contains {c:?}; only letters, digits, '.', '_', ':' and '-' are allowed"
            )));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The owner label.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_id_impls {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    )*};
}
string_id_impls!(UserId, SessionId, Owner);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_object_ids_and_upns() {
        for ok in [
            "fa8bf3dc-eca7-46b7-bad1-db199b62afc3",
            "FA8BF3DC-ECA7-46B7-BAD1-DB199B62AFC3",
            "adele.vance@contoso.com",
            "a_contoso.com#EXT#@x.onmicrosoft.com",
            "o'brien+x!y$z&w*a=b^c`d{e|f}g~h@sub-domain.example.org",
        ] {
            assert!(UserId::parse(ok).is_ok(), "{ok} should be accepted");
        }
        assert_eq!(
            UserId::parse("Adele@Contoso.COM").unwrap().as_str(),
            "adele@contoso.com"
        );
    }

    #[test]
    fn refuses_everything_that_could_bend_a_url() {
        let long = format!("{}@x.com", "a".repeat(251));
        for bad in [
            "",
            "..",
            "a/b",
            "a\\b",
            "a?b",
            "a%2fb",
            "a#b",
            "a b@x.com",
            "a\tb@x.com",
            "a\u{0}b@x.com",
            "a..b@x.com",
            "@x.com",
            "a@",
            "a@x/y",
            "a@.x",
            "a@x.",
            "a@x_y.com",
            "plain",
            "../users",
            &long,
        ] {
            assert!(UserId::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(long.len(), 257);
    }

    #[test]
    fn session_ids_are_guids() {
        assert!(SessionId::parse("22553876-f5ab-4529-bffb-cfe50aa89f87").is_ok());
        for bad in [
            "",
            "not-a-guid",
            "22553876f5ab4529bffbcfe50aa89f87",
            "22553876-f5ab-4529-bffb-cfe50aa89f8g",
        ] {
            assert!(SessionId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn owners_are_short_and_plain() {
        assert!(Owner::parse("bot-1:prod.eu_west").is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(129)] {
            assert!(Owner::parse(bad).is_err(), "{bad:?}");
        }
    }
}
