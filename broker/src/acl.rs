//! Per-identity topic ACLs, written in the conventions of Mosquitto's `acl_file`.
//!
//! ```text
//! # comment
//! topic [read|write|readwrite|deny] <topic filter>     (access defaults to readwrite)
//! user <identity>
//! pattern [read|write|readwrite|deny] <topic filter with %c / %u>
//! ```
//!
//! - `topic` lines before any `user` line apply to every identity; after `user <name>` they
//!   apply to that identity only, until the next `user` line. (Mosquitto applies the lines
//!   before the first `user` to anonymous clients; the edge has none, every client presents a
//!   certificate, so here they are the rules shared by all.)
//! - `pattern` lines apply to every identity wherever they appear; `%c` and `%u` are both
//!   replaced by the certificate identity.
//! - `read` allows SUBSCRIBE and receiving, `write` allows PUBLISH, `deny` refuses both and
//!   wins over every grant, whatever the order of the lines.
//! - A topic starting with `$` is only matched by ACL topics that start with `$` too, so `#`
//!   does not grant `$SYS/...` (as in Mosquitto).
//!
//! Mosquitto 2's own acl_file plugin does not check SUBSCRIBE at all and filters each message
//! at delivery instead; the edge decides at SUBSCRIBE time, so a filter is allowed only when
//! the ACL covers every topic the filter can match ([`Acl::can_subscribe`]), and refused when
//! a `deny` entry overlaps any part of it. [`Acl::can_read`] answers for a single topic, for
//! filtering at delivery.
//!
//! An identity containing `+`, `#`, `/` or NUL gets no access at all: substituted into a
//! pattern it would widen it (`devices/%c/#` with `%c = +`), which is why Mosquitto refuses
//! such client ids too.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use telemon_model::topic::filter_matches;
use tracing::debug;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AclError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("line {line}: {reason}")]
    Syntax { line: usize, reason: String },
    #[error("{path}:{line}: {reason}")]
    InFile {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// What an ACL line grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn allows_read(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    fn allows_write(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

/// One `topic` or `pattern` line.
#[derive(Clone, Debug)]
struct Rule {
    access: Access,
    /// The topic filter as written, `%c`/`%u` not yet substituted for patterns.
    filter: String,
}

impl Rule {
    /// The filter with the identity substituted. Only called with identities that passed
    /// [`is_safe_identity`], so the result has exactly the wildcards the file wrote.
    fn resolve(&self, identity: &str) -> String {
        self.filter.replace("%c", identity).replace("%u", identity)
    }
}

/// A parsed ACL: which identity may publish and subscribe where.
#[derive(Clone, Debug, Default)]
pub struct Acl {
    /// `topic` lines before the first `user` line.
    shared: Vec<Rule>,
    /// `topic` lines after `user <identity>`.
    per_user: HashMap<String, Vec<Rule>>,
    /// `pattern` lines.
    patterns: Vec<Rule>,
}

impl Acl {
    /// Parses ACL text; an error names the line.
    pub fn parse(text: &str) -> Result<Acl, AclError> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;

        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let syntax = |reason: String| AclError::Syntax { line, reason };
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }

            let (keyword, rest) = split_word(trimmed);
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(syntax("`user` needs an identity".into()));
                    }
                    user = Some(rest.to_string());
                }
                "topic" | "pattern" => {
                    let rule = parse_rule(rest).map_err(syntax)?;
                    if keyword == "pattern" {
                        if !rule.filter.contains("%c") && !rule.filter.contains("%u") {
                            debug!(line, "ACL pattern without %c or %u applies to everyone");
                        }
                        acl.patterns.push(rule);
                    } else if let Some(user) = &user {
                        acl.per_user.entry(user.clone()).or_default().push(rule);
                    } else {
                        acl.shared.push(rule);
                    }
                }
                other => {
                    return Err(syntax(format!(
                        "unknown keyword {other:?}: expected topic, pattern or user"
                    )))
                }
            }
        }
        Ok(acl)
    }

    /// Reads and parses an ACL file.
    pub fn load(path: &Path) -> Result<Acl, AclError> {
        let text = fs::read_to_string(path).map_err(|source| AclError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Acl::parse(&text).map_err(|e| match e {
            AclError::Syntax { line, reason } => AclError::InFile {
                path: path.to_path_buf(),
                line,
                reason,
            },
            other => other,
        })
    }

    /// The ACL when none is configured: a device publishes under `devices/<identity>/` and
    /// subscribes to its own commands, `devices/<identity>/commands/#`.
    pub fn default_devices() -> Acl {
        Acl {
            patterns: vec![
                Rule {
                    access: Access::Write,
                    filter: "devices/%c/#".into(),
                },
                Rule {
                    access: Access::Read,
                    filter: "devices/%c/commands/#".into(),
                },
            ],
            ..Acl::default()
        }
    }

    /// Whether `identity` may PUBLISH to `topic`. A topic with wildcards, an empty topic or
    /// one with NUL is never publishable.
    pub fn can_publish(&self, identity: &str, topic: &str) -> bool {
        if !is_safe_identity(identity) || !is_valid_topic_name(topic) {
            return false;
        }
        let mut granted = false;
        for rule in self.rules_for(identity) {
            let filter = rule.resolve(identity);
            if !dollar_compatible(&filter, topic) || !filter_matches(&filter, topic) {
                continue;
            }
            if rule.access == Access::Deny {
                return false;
            }
            granted |= rule.access.allows_write();
        }
        granted
    }

    /// Whether `identity` may receive a message published to `topic`.
    pub fn can_read(&self, identity: &str, topic: &str) -> bool {
        if !is_safe_identity(identity) || !is_valid_topic_name(topic) {
            return false;
        }
        let mut granted = false;
        for rule in self.rules_for(identity) {
            let filter = rule.resolve(identity);
            if !dollar_compatible(&filter, topic) || !filter_matches(&filter, topic) {
                continue;
            }
            if rule.access == Access::Deny {
                return false;
            }
            granted |= rule.access.allows_read();
        }
        granted
    }

    /// Whether `identity` may SUBSCRIBE to `filter`: one `read` entry must cover every topic
    /// the filter can match (ACL `devices/x/#` allows `devices/x/+/a`, not `devices/#`), and no
    /// `deny` entry may cover the whole filter. A `deny` that covers only part of it (`#` with
    /// `deny secret/#`) leaves the subscription in place, and the edge drops messages on the
    /// denied topics at delivery ([`Acl::can_read`]), as Mosquitto does.
    /// `$share/<group>/<filter>` is checked as `<filter>`.
    pub fn can_subscribe(&self, identity: &str, filter: &str) -> bool {
        if !is_safe_identity(identity) {
            return false;
        }
        let Some(filter) = shared_subscription_filter(filter) else {
            return false;
        };
        if !is_valid_filter(filter) {
            return false;
        }

        let mut granted = false;
        for rule in self.rules_for(identity) {
            let acl = rule.resolve(identity);
            if !dollar_compatible(&acl, filter) {
                continue;
            }
            if rule.access == Access::Deny {
                if filter_covers(&acl, filter) {
                    return false;
                }
            } else if rule.access.allows_read() && filter_covers(&acl, filter) {
                granted = true;
            }
        }
        granted
    }

    /// Whether any `deny` entry exists: only then can a granted subscription match a topic
    /// its subscriber may not read, so only then must deliveries be checked one by one.
    pub fn has_deny(&self) -> bool {
        let all = self.shared.iter().chain(self.per_user.values().flatten());
        all.chain(&self.patterns).any(|r| r.access == Access::Deny)
    }

    fn rules_for<'a>(&'a self, identity: &str) -> impl Iterator<Item = &'a Rule> {
        let own = self
            .per_user
            .get(identity)
            .map(Vec::as_slice)
            .unwrap_or_default();
        self.shared.iter().chain(own).chain(&self.patterns)
    }
}

/// `topic`/`pattern` arguments: an optional access word, then the topic filter (the rest of
/// the line, which may contain spaces). A lone word is the topic, as in Mosquitto.
fn parse_rule(rest: &str) -> Result<Rule, String> {
    let (first, after) = split_word(rest);
    if first.is_empty() {
        return Err("missing topic".into());
    }
    let access = match first {
        "read" => Some(Access::Read),
        "write" => Some(Access::Write),
        "readwrite" => Some(Access::ReadWrite),
        "deny" => Some(Access::Deny),
        _ => None,
    };
    let (access, filter) = match access {
        Some(access) if !after.is_empty() => (access, after),
        _ => (Access::ReadWrite, rest),
    };
    if !is_valid_filter(filter) {
        return Err(format!(
            "invalid topic filter {filter:?}: `+` and `#` must fill a whole level, `#` must be last"
        ));
    }
    Ok(Rule {
        access,
        filter: filter.to_string(),
    })
}

fn split_word(text: &str) -> (&str, &str) {
    match text.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim()),
        None => (text, ""),
    }
}

/// Identities come from validated certificates, but a pattern substitution must never be
/// the place where that assumption breaks.
fn is_safe_identity(identity: &str) -> bool {
    !identity.is_empty() && !identity.contains(['+', '#', '/', '\0'])
}

/// A topic name as PUBLISH carries it: non-empty, no wildcards, no NUL.
fn is_valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A topic filter: non-empty, no NUL, wildcards filling whole levels, `#` only last.
fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "+" => true,
        "#" => i == last,
        other => !other.contains(['+', '#']),
    })
}

/// `$share/<group>/<filter>` -> `<filter>`; other filters unchanged; `None` when malformed.
fn shared_subscription_filter(filter: &str) -> Option<&str> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        return Some(filter);
    };
    let (group, inner) = rest.split_once('/')?;
    let valid_group = !group.is_empty() && !group.contains(['+', '#']);
    (valid_group && !inner.is_empty()).then_some(inner)
}

/// A `$` topic or filter is only reachable through an ACL entry that starts with `$` too.
fn dollar_compatible(acl: &str, topic_or_filter: &str) -> bool {
    !topic_or_filter.starts_with('$') || acl.starts_with('$')
}

/// Whether every topic matched by the subscription `filter` is matched by `acl`.
fn filter_covers(acl: &str, filter: &str) -> bool {
    let mut filter_levels = filter.split('/');
    for acl_level in acl.split('/') {
        if acl_level == "#" {
            return true;
        }
        let Some(level) = filter_levels.next() else {
            return false;
        };
        let covered = match acl_level {
            "+" => level != "#",
            exact => level == exact,
        };
        if !covered {
            return false;
        }
    }
    filter_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(text: &str) -> Acl {
        Acl::parse(text).unwrap()
    }

    #[test]
    fn default_lets_a_device_write_its_own_tree_and_read_its_commands() {
        let acl = Acl::default_devices();
        assert!(acl.can_publish("bed-7", "devices/bed-7/telemetry"));
        assert!(acl.can_publish("bed-7", "devices/bed-7/status"));
        assert!(!acl.can_publish("bed-7", "devices/bed-8/telemetry"));
        assert!(!acl.can_publish("bed-7", "alerts/x"));
        assert!(acl.can_subscribe("bed-7", "devices/bed-7/commands/#"));
        assert!(acl.can_subscribe("bed-7", "devices/bed-7/commands/reboot"));
        assert!(acl.can_subscribe("bed-7", "devices/bed-7/commands/+"));
        assert!(!acl.can_subscribe("bed-7", "devices/bed-7/telemetry"));
        assert!(!acl.can_subscribe("bed-7", "devices/bed-7/#"));
        assert!(!acl.can_subscribe("bed-7", "devices/+/commands/#"));
        assert!(!acl.can_subscribe("bed-7", "#"));
        assert!(acl.can_read("bed-7", "devices/bed-7/commands/reboot"));
        assert!(!acl.can_read("bed-7", "devices/bed-8/commands/reboot"));
    }

    #[test]
    fn dangerous_identities_never_widen_a_pattern() {
        let acl = Acl::default_devices();
        for identity in ["+", "#", "a/b", "", "bed\0"] {
            assert!(
                !acl.can_publish(identity, "devices/x/telemetry"),
                "{identity:?}"
            );
            assert!(!acl.can_publish(identity, &format!("devices/{identity}/telemetry")));
            assert!(
                !acl.can_subscribe(identity, "devices/x/commands/#"),
                "{identity:?}"
            );
            assert!(!acl.can_subscribe(identity, &format!("devices/{identity}/commands/#")));
            assert!(
                !acl.can_read(identity, "devices/x/commands/a"),
                "{identity:?}"
            );
        }
    }

    #[test]
    fn publishing_to_a_wildcard_or_invalid_topic_is_denied() {
        let acl = acl("topic readwrite #\n");
        assert!(acl.can_publish("gw", "a/b"));
        for topic in ["a/+", "a/#", "#", "+", "", "a\0b"] {
            assert!(!acl.can_publish("gw", topic), "{topic:?}");
        }
    }

    #[test]
    fn malformed_subscription_filters_are_refused() {
        let acl = acl("topic readwrite #\n");
        assert!(acl.can_subscribe("gw", "a/+/b"));
        for filter in [
            "",
            "a/#/b",
            "a#",
            "a/b+",
            "+a",
            "a\0",
            "$share/g",
            "$share//a",
        ] {
            assert!(!acl.can_subscribe("gw", filter), "{filter:?}");
        }
    }

    #[test]
    fn dollar_topics_need_an_explicit_dollar_grant() {
        let open = acl("topic readwrite #\ntopic readwrite +/#\n");
        assert!(!open.can_publish("a", "$SYS/broker/uptime"));
        assert!(!open.can_subscribe("a", "$SYS/#"));
        assert!(!open.can_read("a", "$SYS/broker/uptime"));

        let sys = acl("topic read $SYS/#\n");
        assert!(sys.can_subscribe("a", "$SYS/#"));
        assert!(sys.can_subscribe("a", "$SYS/broker/+"));
        assert!(sys.can_read("a", "$SYS/broker/uptime"));
        assert!(!sys.can_publish("a", "$SYS/broker/uptime"));
    }

    #[test]
    fn user_sections_apply_to_their_identity_only() {
        let acl = acl(concat!(
            "topic read public/#\n",
            "user gw-1\n",
            "topic write zigbee2mqtt/#\n",
            "topic read zigbee2mqtt/bridge/request/#\n",
            "user gw-2\n",
            "topic write tasmota/#\n",
        ));
        assert!(acl.can_publish("gw-1", "zigbee2mqtt/living_room_sensor"));
        assert!(acl.can_publish("gw-1", "zigbee2mqtt/bridge/state"));
        assert!(!acl.can_publish("gw-1", "tasmota/tele/x/SENSOR"));
        assert!(acl.can_publish("gw-2", "tasmota/tele/x/SENSOR"));
        assert!(!acl.can_publish("gw-2", "zigbee2mqtt/x"));
        assert!(!acl.can_publish("bed-7", "zigbee2mqtt/x"));
        assert!(acl.can_subscribe("gw-1", "zigbee2mqtt/bridge/request/#"));
        assert!(!acl.can_subscribe("gw-1", "zigbee2mqtt/#"));

        // Lines before the first `user` are shared by everyone.
        for identity in ["gw-1", "gw-2", "bed-7"] {
            assert!(acl.can_subscribe(identity, "public/+/x"), "{identity}");
            assert!(!acl.can_publish(identity, "public/x"), "{identity}");
        }
    }

    #[test]
    fn a_user_section_may_be_reopened() {
        let acl = acl("user a\ntopic write x\nuser b\ntopic write y\nuser a\ntopic write z\n");
        assert!(acl.can_publish("a", "x"));
        assert!(acl.can_publish("a", "z"));
        assert!(!acl.can_publish("a", "y"));
        assert!(acl.can_publish("b", "y"));
    }

    #[test]
    fn patterns_apply_to_everyone_even_after_a_user_line() {
        let acl = acl("user gw-1\ntopic write zigbee2mqtt/#\npattern write devices/%c/telemetry\n");
        assert!(acl.can_publish("bed-7", "devices/bed-7/telemetry"));
        assert!(acl.can_publish("gw-1", "devices/gw-1/telemetry"));
        assert!(!acl.can_publish("bed-7", "zigbee2mqtt/x"));
    }

    #[test]
    fn percent_u_is_the_identity_too_and_may_sit_inside_a_level() {
        let acl = acl("pattern readwrite users/%u/#\npattern write log/dev-%c\n");
        assert!(acl.can_publish("bed-7", "users/bed-7/a"));
        assert!(acl.can_subscribe("bed-7", "users/bed-7/#"));
        assert!(acl.can_publish("bed-7", "log/dev-bed-7"));
        assert!(!acl.can_publish("bed-7", "log/dev-bed-8"));
        assert!(!acl.can_publish("bed-7", "users/bed-8/a"));
    }

    #[test]
    fn deny_wins_over_grants_in_any_order() {
        let before = acl("topic deny devices/bed-7/secret\ntopic readwrite devices/#\n");
        let after = acl("topic readwrite devices/#\ntopic deny devices/bed-7/secret\n");
        for acl in [before, after] {
            assert!(acl.can_publish("x", "devices/bed-7/telemetry"));
            assert!(!acl.can_publish("x", "devices/bed-7/secret"));
            assert!(!acl.can_read("x", "devices/bed-7/secret"));
            assert!(acl.can_read("x", "devices/bed-7/telemetry"));
            // A subscription wholly inside a deny is refused; one that only overlaps it stands,
            // and the edge withholds the denied topics at delivery (can_read above).
            assert!(acl.can_subscribe("x", "devices/#"));
            assert!(acl.can_subscribe("x", "devices/+/secret"));
            assert!(!acl.can_subscribe("x", "devices/bed-7/secret"));
            assert!(acl.has_deny());
            assert!(!Acl::default_devices().has_deny());
            assert!(acl.can_subscribe("x", "devices/bed-7/telemetry"));
            assert!(acl.can_subscribe("x", "devices/bed-8/#"));
        }
    }

    #[test]
    fn a_shared_deny_overrides_a_user_grant_and_a_pattern_deny_a_topic_grant() {
        let acl = acl(concat!(
            "topic deny config/#\n",
            "pattern deny devices/%c/commands/#\n",
            "user admin\n",
            "topic readwrite #\n",
        ));
        assert!(acl.can_publish("admin", "anything/else"));
        assert!(!acl.can_publish("admin", "config/x"));
        assert!(!acl.can_publish("admin", "devices/admin/commands/x"));
        assert!(acl.can_publish("admin", "devices/other/commands/x"));
    }

    #[test]
    fn subscriptions_must_be_covered_by_one_read_entry() {
        let acl = acl("topic read devices/x/#\ntopic read a/+/c\ntopic write w/#\n");
        assert!(acl.can_subscribe("i", "devices/x/#"));
        assert!(acl.can_subscribe("i", "devices/x"));
        assert!(acl.can_subscribe("i", "devices/x/+/a"));
        assert!(acl.can_subscribe("i", "devices/x/+"));
        assert!(!acl.can_subscribe("i", "devices/#"));
        assert!(!acl.can_subscribe("i", "devices/+/a"));
        assert!(!acl.can_subscribe("i", "+/x/a"));
        assert!(acl.can_subscribe("i", "a/b/c"));
        assert!(acl.can_subscribe("i", "a/+/c"));
        assert!(!acl.can_subscribe("i", "a/#"));
        assert!(!acl.can_subscribe("i", "a/+/#"));
        assert!(!acl.can_subscribe("i", "a/+/c/d"));
        assert!(
            !acl.can_subscribe("i", "w/x"),
            "write does not grant subscribe"
        );
    }

    #[test]
    fn shared_subscriptions_are_checked_on_their_inner_filter() {
        let acl = acl("user ingest\ntopic read devices/+/telemetry\n");
        assert!(acl.can_subscribe("ingest", "$share/ingest/devices/+/telemetry"));
        assert!(!acl.can_subscribe("ingest", "$share/ingest/devices/#"));
        assert!(!acl.can_subscribe("ingest", "$share/in+/devices/+/telemetry"));
    }

    #[test]
    fn access_word_is_optional_and_defaults_to_readwrite() {
        let acl = acl("topic a/b\ntopic read\n");
        assert!(acl.can_publish("x", "a/b"));
        assert!(acl.can_subscribe("x", "a/b"));
        // A lone word is a topic named "read", as in Mosquitto.
        assert!(acl.can_publish("x", "read"));
    }

    #[test]
    fn topics_may_contain_spaces_and_lines_may_be_indented() {
        let acl = acl("  topic write  living room/temp  \n\t# indented comment\n");
        assert!(acl.can_publish("x", "living room/temp"));
        assert!(!acl.can_publish("x", "living"));
    }

    #[test]
    fn mosquitto_reference_example() {
        // The rules of the aclfile.example that ships with Mosquitto.
        let acl = acl(concat!(
            "topic read $SYS/#\n",
            "\n",
            "user roger\n",
            "topic foo/bar\n",
            "\n",
            "pattern write $SYS/broker/connection/%c/state\n",
        ));
        assert!(acl.can_subscribe("anyone", "$SYS/#"));
        assert!(acl.can_publish("roger", "foo/bar"));
        assert!(acl.can_subscribe("roger", "foo/bar"));
        assert!(!acl.can_publish("anyone", "foo/bar"));
        assert!(acl.can_publish("bridge-1", "$SYS/broker/connection/bridge-1/state"));
        assert!(!acl.can_publish("bridge-1", "$SYS/broker/connection/bridge-2/state"));
    }

    #[test]
    fn an_empty_acl_denies_everything() {
        let acl = acl("# nothing\n\n");
        assert!(!acl.can_publish("x", "a"));
        assert!(!acl.can_subscribe("x", "a"));
        assert!(!acl.can_read("x", "a"));
    }

    #[test]
    fn syntax_errors_carry_the_line_number() {
        let cases = [
            ("topic read a\nuser\n", 2, "identity"),
            ("\n\nfoo bar\n", 3, "unknown keyword"),
            ("topic\n", 1, "missing topic"),
            ("topic read a/#/b\n", 1, "invalid topic filter"),
            ("# c\npattern write a/b+\n", 2, "invalid topic filter"),
            ("topic deny a#\n", 1, "invalid topic filter"),
        ];
        for (text, want_line, want_reason) in cases {
            match Acl::parse(text) {
                Err(AclError::Syntax { line, reason }) => {
                    assert_eq!(line, want_line, "{text:?}");
                    assert!(reason.contains(want_reason), "{text:?}: {reason}");
                }
                other => panic!("{text:?}: expected a syntax error, got {other:?}"),
            }
        }
    }

    #[test]
    fn load_names_the_file_and_line() {
        let dir = std::env::temp_dir().join(format!("telemon-acl-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.acl");
        fs::write(&path, "topic read a\nbogus\n").unwrap();
        let err = Acl::load(&path).unwrap_err();
        assert!(matches!(err, AclError::InFile { line: 2, .. }), "{err:?}");
        assert!(err.to_string().contains("bad.acl:2"), "{err}");

        let missing = Acl::load(&dir.join("missing.acl")).unwrap_err();
        assert!(matches!(missing, AclError::Io { .. }), "{missing:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reference_acl_file_parses_and_means_what_it_says() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("acl.example");
        let acl = Acl::load(&path).unwrap();
        assert!(acl.can_publish("bed-7", "devices/bed-7/telemetry"));
        assert!(acl.can_publish("bed-7", "devices/bed-7/senml"));
        assert!(!acl.can_publish("bed-7", "devices/bed-8/telemetry"));
        assert!(acl.can_subscribe("bed-7", "devices/bed-7/commands/#"));
        assert!(!acl.can_subscribe("bed-7", "devices/#"));
        assert!(acl.can_publish("gw-1", "zigbee2mqtt/living_room_sensor"));
        assert!(acl.can_subscribe("gw-1", "zigbee2mqtt/bridge/request/#"));
        assert!(!acl.can_publish("bed-7", "zigbee2mqtt/living_room_sensor"));
        assert!(acl.can_publish("tasmota-gw", "tele/kitchen_plug/SENSOR"));
        assert!(!acl.can_publish("gw-1", "devices/bed-7/telemetry"));
        assert!(!acl.can_publish("bed-7", "$SYS/x"));
    }

    #[test]
    fn cover_helper() {
        assert!(filter_covers("#", "a/b/#"));
        assert!(filter_covers("a/#", "a"));
        assert!(!filter_covers("a/+", "a/#"));
        assert!(!filter_covers("a/+", "a"));
        assert!(filter_covers("+/+", "+/b"));
    }
}
