//! Topic patterns of configured mappings: MQTT filter syntax plus named captures.
//!
//! A pattern is a topic filter whose levels may also be `{name}`, which matches one level
//! like `+` and captures it: `shellies/{device}/sensor/{metric}`. `{device}` names the
//! device; any other capture can be used in the mapping's metric template.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Exact(String),
    /// `+`
    Any,
    /// `{name}`
    Capture(String),
    /// `#`, only last.
    Rest,
}

/// A compiled topic pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    levels: Vec<Level>,
}

/// The captured levels of one matched topic, in pattern order.
pub type Captures<'p, 't> = Vec<(&'p str, &'t str)>;

impl Pattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("empty topic pattern".into());
        }
        let parts: Vec<&str> = pattern.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            levels.push(Self::level(part, i + 1 == parts.len())?);
        }

        let mut names: Vec<&str> = levels
            .iter()
            .filter_map(|l| match l {
                Level::Capture(n) => Some(n.as_str()),
                _ => None,
            })
            .collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(format!("a capture appears twice in {pattern:?}"));
        }
        Ok(Pattern { levels })
    }

    fn level(part: &str, last: bool) -> Result<Level, String> {
        match part {
            "+" => Ok(Level::Any),
            "#" if last => Ok(Level::Rest),
            "#" => Err("'#' may only be the last level".into()),
            _ => {
                if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                    let valid = |c: char| c.is_ascii_lowercase() || c == '_';
                    if name.is_empty() || !name.chars().all(valid) {
                        return Err(format!("capture {part:?}: use {{lowercase_name}}"));
                    }
                    return Ok(Level::Capture(name.to_string()));
                }
                if part.contains(['+', '#', '{', '}']) {
                    return Err(format!(
                        "level {part:?} mixes text with a wildcard or capture"
                    ));
                }
                Ok(Level::Exact(part.to_string()))
            }
        }
    }

    pub fn has_capture(&self, name: &str) -> bool {
        self.levels
            .iter()
            .any(|l| matches!(l, Level::Capture(n) if n == name))
    }

    /// The MQTT filter to subscribe to for this pattern.
    pub fn filter(&self) -> String {
        let levels: Vec<&str> = self
            .levels
            .iter()
            .map(|l| match l {
                Level::Exact(s) => s.as_str(),
                Level::Any | Level::Capture(_) => "+",
                Level::Rest => "#",
            })
            .collect();
        levels.join("/")
    }

    /// The captures if `topic` matches, as a broker would match the filter (a leading
    /// wildcard does not match `$` topics, MQTT 4.7.2).
    pub fn matches<'p, 't>(&'p self, topic: &'t str) -> Option<Captures<'p, 't>> {
        let starts_wild = !matches!(self.levels.first(), Some(Level::Exact(_)));
        if topic.starts_with('$') && starts_wild {
            return None;
        }

        let mut captures = Vec::new();
        let mut topic_levels = topic.split('/');
        for level in &self.levels {
            match level {
                Level::Rest => return Some(captures),
                Level::Any => {
                    topic_levels.next()?;
                }
                Level::Capture(name) => captures.push((name.as_str(), topic_levels.next()?)),
                Level::Exact(text) => {
                    if topic_levels.next()? != text {
                        return None;
                    }
                }
            }
        }
        topic_levels.next().is_none().then_some(captures)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let levels: Vec<String> = self
            .levels
            .iter()
            .map(|l| match l {
                Level::Exact(s) => s.clone(),
                Level::Any => "+".into(),
                Level::Capture(n) => format!("{{{n}}}"),
                Level::Rest => "#".into(),
            })
            .collect();
        f.write_str(&levels.join("/"))
    }
}

/// A metric template: text with `{capture}` references, rendered per message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Capture(String),
}

impl Template {
    /// Parses `text`, refusing references to captures `pattern` does not have.
    pub fn parse(text: &str, pattern: &Pattern) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .ok_or_else(|| format!("unclosed '{{' in {text:?}"))?;
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let name = &rest[open + 1..close];
            if !pattern.has_capture(name) {
                return Err(format!(
                    "{text:?} uses {{{name}}}, which the topic does not capture"
                ));
            }
            parts.push(Part::Capture(name.to_string()));
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unopened '}}' in {text:?}"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    pub fn render(&self, captures: &Captures<'_, '_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Capture(name) => {
                    let value = captures.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
                    out.push_str(value.unwrap_or_default());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_named_levels() {
        let p = Pattern::parse("shellies/{device}/sensor/{metric}").unwrap();
        let caps = p.matches("shellies/ht-1/sensor/temperature").unwrap();
        assert_eq!(caps, vec![("device", "ht-1"), ("metric", "temperature")]);
        assert_eq!(p.matches("shellies/ht-1/sensor"), None);
        assert_eq!(p.matches("shellies/ht-1/sensor/t/x"), None);
        assert_eq!(p.matches("shellies/ht-1/relay/0"), None);
        assert_eq!(p.filter(), "shellies/+/sensor/+");
        assert_eq!(p.to_string(), "shellies/{device}/sensor/{metric}");
    }

    #[test]
    fn wildcards_match_like_a_broker() {
        let p = Pattern::parse("zigbee2mqtt/bridge/#").unwrap();
        assert!(p.matches("zigbee2mqtt/bridge/state").is_some());
        assert!(p.matches("zigbee2mqtt/bridge").is_some());
        assert!(p.matches("zigbee2mqtt/door").is_none());
        let p = Pattern::parse("{device}/status").unwrap();
        assert!(p.matches("$SYS/status").is_none());
        assert!(Pattern::parse("+/x").unwrap().matches("a/x").is_some());
    }

    #[test]
    fn refuses_malformed_patterns() {
        for bad in [
            "",
            "a/#/b",
            "a/{Dev}/b",
            "a/{}/b",
            "a/x+/b",
            "a/{d}x/b",
            "{d}/{d}",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates_render_captures() {
        let p = Pattern::parse("shellies/{device}/relay/{channel}").unwrap();
        let t = Template::parse("relay_{channel}", &p).unwrap();
        let caps = p.matches("shellies/s1/relay/0").unwrap();
        assert_eq!(t.render(&caps), "relay_0");
        assert!(Template::parse("relay_{metric}", &p).is_err());
        assert!(Template::parse("relay_{channel", &p).is_err());
        assert!(Template::parse("relay_}", &p).is_err());
    }
}
