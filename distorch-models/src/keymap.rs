//! [`KeyMap`]: from a model's own (diffusers) unit names to another checkpoint layout's, by
//! sub-tree prefix, with optional renaming of a sub-tree's first segment.

use distorch_core::runtime::ExpectedTensor;

/// One prefix rule: units under `from` live under `to`; the first segment after the prefix is
/// renamed by `inner` when it matches.
#[derive(Debug, Clone)]
struct Rule {
    from: String,
    to: String,
    inner: &'static [(&'static str, &'static str)],
}

/// A translation of unit names.
#[derive(Debug, Clone, Default)]
pub(crate) struct KeyMap {
    rules: Vec<Rule>,
}

impl KeyMap {
    /// Units under `from` live under `to`.
    pub(crate) fn prefix(&mut self, from: impl Into<String>, to: impl Into<String>) {
        self.rename(from, to, &[]);
    }

    /// Units under `from` live under `to`, with the first segment after it renamed.
    pub(crate) fn rename(
        &mut self,
        from: impl Into<String>,
        to: impl Into<String>,
        inner: &'static [(&'static str, &'static str)],
    ) {
        self.rules.push(Rule {
            from: from.into(),
            to: to.into(),
            inner,
        });
    }

    /// The file's name of the model's unit `unit` (unchanged when no rule applies).
    pub(crate) fn unit(&self, unit: &str) -> String {
        let best = self
            .rules
            .iter()
            .filter(|r| {
                unit == r.from
                    || unit
                        .strip_prefix(r.from.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            })
            .max_by_key(|r| r.from.len());
        let Some(r) = best else {
            return unit.to_owned();
        };
        let rest = &unit[r.from.len()..];
        let rest = rest.strip_prefix('.').unwrap_or(rest);
        let (first, tail) = rest.split_once('.').unwrap_or((rest, ""));
        let first = r
            .inner
            .iter()
            .find(|(a, _)| *a == first)
            .map_or(first, |(_, b)| b);
        [r.to.as_str(), first, tail]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(".")
    }

    /// A tensor key (unit and parameter) in the file's layout.
    pub(crate) fn tensor(&self, key: &str) -> String {
        match key.rsplit_once('.') {
            Some((unit, param)) => format!("{}.{param}", self.unit(unit)),
            None => self.unit(key),
        }
    }

    /// Expected tensors in the file's layout.
    pub(crate) fn expected(&self, expected: Vec<ExpectedTensor>) -> Vec<ExpectedTensor> {
        expected
            .into_iter()
            .map(|e| ExpectedTensor {
                name: self.tensor(&e.name),
                shape: e.shape,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_and_inner_segments_are_renamed() {
        let mut m = KeyMap::default();
        m.rename(
            "down_blocks.0.resnets.0",
            "input_blocks.1.0",
            &[("norm1", "in_layers.0")],
        );
        m.prefix("down_blocks.0", "elsewhere");
        m.prefix("conv_in", "input_blocks.0.0");
        assert_eq!(
            m.unit("down_blocks.0.resnets.0.norm1"),
            "input_blocks.1.0.in_layers.0"
        );
        assert_eq!(
            m.unit("down_blocks.0.resnets.0.conv9"),
            "input_blocks.1.0.conv9"
        );
        assert_eq!(
            m.unit("down_blocks.0.attentions.0.norm"),
            "elsewhere.attentions.0.norm"
        );
        assert_eq!(
            m.unit("down_blocks.01"),
            "down_blocks.01",
            "whole segments only"
        );
        assert_eq!(m.tensor("conv_in.weight"), "input_blocks.0.0.weight");
        assert_eq!(m.unit("time_embedding.linear_1"), "time_embedding.linear_1");
    }
}
