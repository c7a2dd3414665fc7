//! docs/design.md is the map a newcomer follows: every file, test and item
//! it names in backticks exists in the tree. (It drifted once: a refusal
//! said to be in the wrong file, a method that had been renamed.) No KVM,
//! no processes: it reads the page and the sources.

use std::path::{Path, PathBuf};

const PAGE: &str = "docs/design.md";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The backticked spans of `page`, outside fenced code blocks, with their
/// line numbers.
fn spans(page: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (i, line) in page.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut parts = line.split('`');
        parts.next();
        while let (Some(inside), Some(_)) = (parts.next(), parts.next()) {
            out.push((i + 1, inside.to_string()));
        }
    }
    out
}

/// Every `.rs` file of the workspace (build output and git aside).
fn sources(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                sources(&p, out);
            }
        } else if name.ends_with(".rs") {
            if let Ok(text) = std::fs::read_to_string(&p) {
                out.push((p, text));
            }
        }
    }
}

/// Whether `text` has `word` as a whole identifier followed by one of
/// `after` (after optional spaces), or preceded by `before `.
fn has_ident(text: &str, word: &str, before: &[&str], after: &[char]) -> bool {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut from = 0;
    while let Some(at) = text[from..].find(word) {
        let s = from + at;
        let e = s + word.len();
        from = e;
        let prev = text[..s].chars().next_back();
        let next = text[e..].chars().next();
        if prev.is_some_and(is_ident) || next.is_some_and(is_ident) {
            continue;
        }
        let head = text[..s].trim_end();
        if before.iter().any(|b| {
            head.ends_with(b)
                && !head[..head.len() - b.len()]
                    .chars()
                    .next_back()
                    .is_some_and(is_ident)
        }) {
            return true;
        }
        if text[e..]
            .trim_start()
            .chars()
            .next()
            .is_some_and(|c| after.contains(&c))
        {
            return true;
        }
    }
    false
}

/// A token that names a file: a relative path with a known extension.
fn as_path(token: &str) -> Option<(&str, Option<&str>)> {
    let (path, item) = match token.split_once("::") {
        Some((p, i)) => (p, Some(i)),
        None => (token, None),
    };
    let known = [".rs", ".md", ".sh", ".toml", ".c", ".S", ".ld", ".service"];
    (path.contains('/') && known.iter().any(|x| path.ends_with(x))).then_some((path, item))
}

#[test]
fn every_file_test_and_item_the_design_page_names_exists() {
    let page = std::fs::read_to_string(root().join(PAGE)).expect("docs/design.md");
    let mut code = Vec::new();
    sources(root(), &mut code);
    assert!(code.len() > 50, "found only {} sources", code.len());
    let defines = |ty: &str| -> Vec<&str> {
        code.iter()
            .filter(|(_, t)| has_ident(t, ty, &["struct", "enum", "trait", "type"], &[]))
            .map(|(_, t)| t.as_str())
            .collect()
    };
    let mut wrong = Vec::new();
    let (mut files, mut items) = (0, 0);
    for (line, span) in spans(&page) {
        let tokens = span.split(|c: char| c.is_whitespace() || ",()→".contains(c));
        for token in tokens.filter(|t| !t.is_empty()) {
            if let Some((path, test)) = as_path(token) {
                files += 1;
                let file = root().join(path);
                match (std::fs::read_to_string(&file), test) {
                    (Err(_), _) => wrong.push(format!("{PAGE}:{line}: no file {path}")),
                    (Ok(text), Some(f)) if !has_ident(&text, f, &["fn"], &[]) => {
                        wrong.push(format!("{PAGE}:{line}: {path} has no fn {f}"))
                    }
                    _ => {}
                }
                continue;
            }
            // Type::item (a method, constant, variant or field of a type).
            let Some((ty, item)) = token.rsplit_once("::").and_then(|(head, item)| {
                let ty = head.rsplit("::").next()?;
                let item = item.trim_end_matches(|c: char| !c.is_alphanumeric() && c != '_');
                (ty.starts_with(|c: char| c.is_ascii_uppercase())
                    && !item.is_empty()
                    && item.chars().all(|c| c.is_alphanumeric() || c == '_'))
                .then_some((ty, item))
            }) else {
                continue;
            };
            items += 1;
            let homes = defines(ty);
            if homes.is_empty() {
                wrong.push(format!("{PAGE}:{line}: no type {ty} (in `{span}`)"));
            } else if !code
                .iter()
                .any(|(_, t)| has_ident(t, item, &["fn", "const"], &[]))
                && !homes
                    .iter()
                    .any(|t| has_ident(t, item, &[], &[',', '(', '{', ':', '=']))
            {
                wrong.push(format!("{PAGE}:{line}: {ty} has no {item} (in `{span}`)"));
            }
        }
    }
    eprintln!("{PAGE}: {files} files and tests, {items} items named");
    assert!(
        files > 50 && items > 20,
        "{files} files, {items} items: the page's form changed?"
    );
    assert!(
        wrong.is_empty(),
        "the design page names what is not there:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_checker_finds_what_is_missing() {
    assert!(has_ident(
        "pub fn with_ram_paused<R>(",
        "with_ram_paused",
        &["fn"],
        &[]
    ));
    assert!(!has_ident(
        "pub fn with_ram_paused_x(",
        "with_ram_paused",
        &["fn"],
        &[]
    ));
    assert!(!has_ident(
        "// with_paused_ram is gone",
        "with_paused_ram",
        &["fn"],
        &[]
    ));
    assert!(has_ident(
        "pub enum EndReason {",
        "EndReason",
        &["enum"],
        &[]
    ));
    assert!(has_ident(
        "    Superseded(u64),",
        "Superseded",
        &[],
        &['(', ',']
    ));
    assert_eq!(
        as_path("tests/ha.rs::a_test"),
        Some(("tests/ha.rs", Some("a_test")))
    );
    assert_eq!(as_path("pipeline.rs"), None);
    let s = spans("a `x/y.rs` b\n```\n`in/code.rs`\n```\n`z::W`");
    assert_eq!(s, vec![(1, "x/y.rs".into()), (5, "z::W".into())]);
}
