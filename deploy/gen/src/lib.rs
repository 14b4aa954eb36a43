//! Builds `deploy/base/envoy-configmap.yaml` from one source: the module-mode bootstrap
//! `envoy/gateway.yaml.tmpl` (the one the end-to-end tests run Envoy with) plus the deploy-only
//! parts in `deploy/base/envoy-configmap.yaml.tmpl`. No Envoy, no YAML parser: text in, text out,
//! so the committed file keeps the comments of both templates.
//!
//! The deploy template is the output file, with directives on lines whose text starts with `#%`:
//!
//! - `#% set NAME VALUE`: `@NAME@` is VALUE (the rest of the line, verbatim) in both templates;
//! - `#% replace FROM => TO`: FROM, which must occur exactly once in the shared template, becomes
//!   TO before the shared template is rendered;
//! - `#% include PATH`: the body of the block key PATH of the shared template (`admin`,
//!   `static_resources.listeners`, ...), re-indented to the directive's column.
//!
//! Lines whose text starts with `##` are notes about the deploy template and are dropped.
//!
//! Every setting of the shared template must reach the output: each of its non-comment lines has
//! to be inside an included body or be one of the keys above one (those the deploy template
//! writes itself), else generation fails. The shared template's comments outside the included
//! bodies (its header about placeholders) are dropped.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The shared module-mode bootstrap, relative to the repository root.
pub const SHARED_TEMPLATE: &str = "envoy/gateway.yaml.tmpl";
/// The deploy-only parts, relative to the repository root.
pub const DEPLOY_TEMPLATE: &str = "deploy/base/envoy-configmap.yaml.tmpl";
/// The generated, committed ConfigMap, relative to the repository root.
pub const OUTPUT: &str = "deploy/base/envoy-configmap.yaml";

/// Why the bootstrap could not be generated; the message names the file and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

fn err<T>(msg: impl Into<String>) -> Result<T, Error> {
    Err(Error(msg.into()))
}

/// The repository this crate belongs to (`deploy/gen` is two levels down).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("deploy/gen has two parents")
        .to_path_buf()
}

/// The ConfigMap as it should be committed, from the templates under `root`.
pub fn generate_in(root: &Path) -> Result<String, Error> {
    let read = |rel: &str| {
        std::fs::read_to_string(root.join(rel))
            .or_else(|e| err(format!("{}: {e}", root.join(rel).display())))
    };
    generate(&read(SHARED_TEMPLATE)?, &read(DEPLOY_TEMPLATE)?)
}

enum Piece<'a> {
    Text {
        line: usize,
        text: &'a str,
    },
    Include {
        line: usize,
        indent: usize,
        path: &'a str,
    },
}

/// The ConfigMap from the shared template's text and the deploy template's text.
pub fn generate(shared: &str, deploy: &str) -> Result<String, Error> {
    let mut vars = BTreeMap::new();
    let mut replaces = Vec::new();
    let mut pieces = Vec::new();
    for (i, raw) in deploy.lines().enumerate() {
        let line = i + 1;
        let text = raw.trim_start();
        if text.starts_with("##") {
            continue;
        }
        let Some(directive) = text.strip_prefix("#%") else {
            pieces.push(Piece::Text { line, text: raw });
            continue;
        };
        let at = |what: &str| format!("{DEPLOY_TEMPLATE}:{line}: {what}: {raw:?}");
        let directive = directive.trim();
        let (word, rest) = directive.split_once(' ').unwrap_or((directive, ""));
        match word {
            "set" => {
                let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
                if !is_placeholder_name(name) {
                    return err(at("`#% set` needs an upper-case NAME and a value"));
                }
                if vars.insert(name, value).is_some() {
                    return err(at("set twice"));
                }
            }
            "replace" => match rest.split_once(" => ") {
                Some((from, to)) if !from.is_empty() => replaces.push((line, from, to)),
                _ => return err(at("`#% replace` needs `FROM => TO`")),
            },
            "include" if !rest.is_empty() && !rest.contains(' ') => pieces.push(Piece::Include {
                line,
                indent: raw.len() - text.len(),
                path: rest,
            }),
            _ => return err(at("unknown directive (set, replace, include)")),
        }
    }

    let mut shared = shared.to_string();
    for (line, from, to) in replaces {
        match shared.matches(from).count() {
            1 => shared = shared.replacen(from, to, 1),
            n => {
                return err(format!(
                    "{DEPLOY_TEMPLATE}:{line}: `#% replace` expects {from:?} exactly once in \
                     {SHARED_TEMPLATE}, found it {n} times"
                ))
            }
        }
    }
    let mut used = BTreeSet::new();
    let shared = render(&shared, &vars, &mut used, SHARED_TEMPLATE)?;
    let shared: Vec<&str> = shared.lines().collect();

    let mut covered = BTreeSet::new();
    let mut out = String::new();
    for piece in pieces {
        match piece {
            Piece::Text { line, text } => {
                let where_ = format!("{DEPLOY_TEMPLATE}:{line}");
                out.push_str(&render(text, &vars, &mut used, &where_)?);
                out.push('\n');
            }
            Piece::Include { line, indent, path } => {
                let (keys, body) = find_body(&shared, path)
                    .or_else(|e| err(format!("{DEPLOY_TEMPLATE}:{line}: {e}")))?;
                if !body.clone().all(|i| covered.insert(i)) {
                    return err(format!(
                        "{DEPLOY_TEMPLATE}:{line}: `{path}` is already included"
                    ));
                }
                covered.extend(keys);
                reindent(&shared[body], indent, &mut out);
            }
        }
    }

    if let Some((i, text)) = shared
        .iter()
        .enumerate()
        .find(|(i, l)| is_content(l) && !covered.contains(i))
    {
        return err(format!(
            "{SHARED_TEMPLATE}:{}: {:?} would be missing from the deploy bootstrap: `#% include` \
             it (or a key above it) in {DEPLOY_TEMPLATE}",
            i + 1,
            text.trim()
        ));
    }
    if let Some(unused) = vars.keys().find(|k| !used.contains(*k)) {
        return err(format!(
            "{DEPLOY_TEMPLATE}: `#% set {unused}` is used by neither template"
        ));
    }
    Ok(out)
}

fn is_placeholder_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// `@NAME@` placeholders (upper-case: YAML's `"@type"` is not one) replaced in one pass, so a
/// value is never scanned again; every placeholder must have a value.
fn render<'a>(
    text: &str,
    vars: &BTreeMap<&'a str, &str>,
    used: &mut BTreeSet<&'a str>,
    what: &str,
) -> Result<String, Error> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('@') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let name = after.split('@').next().filter(|n| after.len() > n.len());
        match name.filter(|n| is_placeholder_name(n)) {
            Some(name) => {
                let Some((&key, value)) = vars.get_key_value(name) else {
                    return err(format!(
                        "{what}: @{name}@ has no value (`#% set {name} ...` in {DEPLOY_TEMPLATE})"
                    ));
                };
                used.insert(key);
                out.push_str(value);
                rest = &after[name.len() + 1..];
            }
            None => {
                out.push('@');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// A line that carries YAML content (not blank, not only a comment).
fn is_content(line: &str) -> bool {
    let t = line.trim_start();
    !t.is_empty() && !t.starts_with('#')
}

/// The key lines along `path` and the lines of the last key's block body (from the line after
/// the key to its last content line: trailing comments belong to what follows).
fn find_body(lines: &[&str], path: &str) -> Result<(Vec<usize>, Range<usize>), String> {
    let mut scope = 0..lines.len();
    let mut keys = Vec::new();
    for key in path.split('.') {
        let Some(first) = scope.clone().find(|&i| is_content(lines[i])) else {
            return Err(format!(
                "`{path}`: nothing under {:?}",
                keys_text(lines, &keys)
            ));
        };
        let level = indent_of(lines[first]);
        let hits: Vec<usize> = scope
            .clone()
            .filter(|&i| indent_of(lines[i]) == level && is_block_key(lines[i], key))
            .collect();
        let &[at] = hits.as_slice() else {
            return Err(format!(
                "`{path}`: {SHARED_TEMPLATE} has {} block keys `{key}:` (with the value on the \
                 lines below) at this level, expected one",
                hits.len()
            ));
        };
        let mut end = at + 1;
        for (i, l) in lines.iter().enumerate().take(scope.end).skip(at + 1) {
            if !is_content(l) {
                continue;
            }
            let n = indent_of(l);
            if n < level || (n == level && !l.trim_start().starts_with("- ")) {
                break;
            }
            end = i + 1;
        }
        if end == at + 1 {
            return Err(format!("`{path}`: `{key}:` has an empty body"));
        }
        keys.push(at);
        scope = at + 1..end;
    }
    Ok((keys, scope))
}

fn keys_text(lines: &[&str], keys: &[usize]) -> String {
    keys.iter()
        .map(|&i| lines[i].trim())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `key:` alone on its line (a trailing comment allowed), i.e. its value is the block below.
fn is_block_key(line: &str, key: &str) -> bool {
    line.trim_start()
        .strip_prefix(key)
        .and_then(|r| r.strip_prefix(':'))
        .is_some_and(|r| {
            let r = r.trim_start();
            r.is_empty() || r.starts_with('#')
        })
}

/// The body's own indentation (that of its least indented content line) becomes `indent`.
fn reindent(body: &[&str], indent: usize, out: &mut String) {
    let base = body
        .iter()
        .filter(|l| is_content(l))
        .map(|l| indent_of(l))
        .min()
        .unwrap_or(0);
    for l in body {
        if !l.trim().is_empty() {
            out.extend(std::iter::repeat_n(' ', indent));
            out.push_str(&l[indent_of(l).min(base)..]);
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARED: &str = "\
# header about @PORT@
admin:
  address: {port: @PORT@}
static:
  listeners:
  # the main one
  - name: main
    address: {ip: 127.0.0.1}

  clusters:
  - name: c
";

    fn deploy(extra: &str) -> String {
        format!(
            "## a note\n#% set PORT 9901\n{extra}data: |\n  admin:\n    #% include admin\n  \
             static:\n    listeners:\n    #% include static.listeners\n    - name: ops\n    \
             clusters:\n    #% include static.clusters\n"
        )
    }

    #[test]
    fn includes_bodies_reindented_with_vars_and_replaces() {
        let out = generate(
            SHARED,
            &deploy("#% replace {ip: 127.0.0.1} => {ip: 0.0.0.0}\n"),
        )
        .unwrap();
        assert_eq!(
            out,
            "data: |\n  admin:\n    address: {port: 9901}\n  static:\n    listeners:\n    \
             # the main one\n    - name: main\n      address: {ip: 0.0.0.0}\n    - name: ops\n    \
             clusters:\n    - name: c\n"
        );
    }

    #[test]
    fn a_setting_left_out_of_the_deploy_bootstrap_fails() {
        let shared = format!("{SHARED}layered_runtime:\n  layers: []\n");
        let e = generate(&shared, &deploy("")).unwrap_err().to_string();
        assert!(
            e.contains(":12: \"layered_runtime:\" would be missing"),
            "{e}"
        );
        let dropped = deploy("").replace("    #% include static.clusters\n", "");
        let e = generate(SHARED, &dropped).unwrap_err().to_string();
        assert!(e.contains("\"clusters:\" would be missing"), "{e}");
    }

    #[test]
    fn a_replace_that_no_longer_matches_fails() {
        let e = generate(
            SHARED,
            &deploy("#% replace {ip: 10.0.0.1} => {ip: 0.0.0.0}\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("exactly once") && e.contains("found it 0 times"),
            "{e}"
        );
    }

    #[test]
    fn placeholders_must_have_values_and_values_must_be_used() {
        let e = generate(SHARED, "#% include admin\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("@PORT@ has no value"), "{e}");
        let e = generate(SHARED, &deploy("#% set UNUSED x\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`#% set UNUSED` is used by neither"), "{e}");
        // A value is not rendered again, and `@type` is not a placeholder.
        let out = generate(
            "a:\n  b: @V@\n",
            "#% set V @V@ \"@type\"\nx:\n  #% include a\n",
        );
        assert_eq!(out.unwrap(), "x:\n  b: @V@ \"@type\"\n");
    }

    #[test]
    fn bad_includes_fail() {
        for (path, want) in [
            ("nope", "0 block keys `nope:`"),
            ("static.listeners.x", "0 block keys `x:`"),
            ("admin.address", "0 block keys `address:`"),
        ] {
            let e = generate(SHARED, &format!("#% set PORT 1\n#% include {path}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{path}: {e}");
        }
        let twice = format!("{}    #% include admin\n", deploy(""));
        let e = generate(SHARED, &twice).unwrap_err().to_string();
        assert!(e.contains("`admin` is already included"), "{e}");
    }
}
