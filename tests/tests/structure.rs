//! The agent's structure as issue 21 set it, kept: no source file of `datapath-user/src` over
//! 600 lines and no function over 80 (test code aside), no import cycle between its top-level
//! modules, and nothing of the tests or the benchmark in the object a node runs.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 80;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../datapath-user/src")
}

/// Every `.rs` file under `dir`, test-only files (`tests.rs`) left out.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(sources(&p));
        } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("tests.rs") {
            out.push(p);
        }
    }
    out
}

/// A file's lines before its `#[cfg(test)]` module.
fn code_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .map(String::from)
        .collect()
}

/// A line with string and character literals blanked, so their braces do not count.
fn without_literals(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                while let Some(d) = chars.next() {
                    match d {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '\'' if chars.clone().nth(1) == Some('\'') => {
                chars.next();
                chars.next();
            }
            _ => out.push(c),
        }
    }
    if let Some(i) = out.find("//") {
        out.truncate(i);
    }
    out
}

/// (name, first line, length) of every function in `lines`.
fn functions(lines: &[String]) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let Some(rest) = [
            "pub fn ",
            "fn ",
            "pub(super) fn ",
            "pub(crate) fn ",
            "pub async fn ",
            "async fn ",
        ]
        .iter()
        .find_map(|p| t.strip_prefix(p)) else {
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let (mut depth, mut opened) = (0i32, false);
        for (j, body) in lines.iter().enumerate().skip(i) {
            let code = without_literals(body);
            if !opened && code.trim_end().ends_with(';') {
                break; // a declaration without a body
            }
            for c in code.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if opened && depth == 0 {
                out.push((name.clone(), i + 1, j - i + 1));
                break;
            }
        }
    }
    out
}

#[test]
fn no_file_over_600_lines_and_no_function_over_80() {
    let mut long = Vec::new();
    for path in sources(&src()) {
        let lines = code_lines(&path);
        if lines.len() > MAX_FILE_LINES {
            long.push(format!("{}: {} lines", path.display(), lines.len()));
        }
        for (name, at, len) in functions(&lines) {
            if len > MAX_FN_LINES {
                long.push(format!("{}:{at}: fn {name} is {len} lines", path.display()));
            }
        }
    }
    assert!(long.is_empty(), "too long:\n{}", long.join("\n"));
}

/// The top-level modules each top-level module of `datapath-user` uses (`crate::x`).
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let root = src();
    let tops: BTreeSet<String> = fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() || p.extension().is_some_and(|x| x == "rs"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "lib" && n != "main")
        .collect();
    let mut graph = BTreeMap::new();
    for top in &tops {
        let dir = root.join(top);
        let files = if dir.is_dir() {
            sources(&dir)
        } else {
            vec![root.join(format!("{top}.rs"))]
        };
        let text: String = files.iter().map(|f| code_lines(f).join("\n")).collect();
        let uses = tops
            .iter()
            .filter(|other| *other != top)
            .filter(|other| uses_module(&text, other))
            .cloned()
            .collect();
        graph.insert(top.clone(), uses);
    }
    graph
}

/// Whether `text` names `crate::<module>`, directly or inside a `use crate::{...}` group.
fn uses_module(text: &str, module: &str) -> bool {
    if text.contains(&format!("crate::{module}::")) || text.contains(&format!("crate::{module},")) {
        return true;
    }
    text.match_indices("crate::{").any(|(at, _)| {
        let group = &text[at + 8..];
        let mut depth = 1;
        let end = group
            .char_indices()
            .find(|(_, c)| {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                depth == 0
            })
            .map_or(group.len(), |(i, _)| i);
        // Top-level items of the group: at depth 0, after `{` or `,`.
        let mut d = 0;
        let mut item_start = true;
        let mut word = String::new();
        for c in group[..end].chars() {
            match c {
                '{' => d += 1,
                '}' => d -= 1,
                ',' if d == 0 => item_start = true,
                c if item_start && d == 0 && (c.is_alphanumeric() || c == '_') => word.push(c),
                _ if item_start && !word.is_empty() => {
                    if word == module {
                        return true;
                    }
                    word.clear();
                    item_start = false;
                }
                _ => {}
            }
        }
        word == module
    })
}

#[test]
fn no_import_cycle_between_the_agents_modules() {
    let graph = module_graph();
    assert!(graph.len() >= 8, "modules not found: {graph:?}");
    for start in graph.keys() {
        // Depth-first from `start`: reaching it again is a cycle.
        let mut stack: Vec<Vec<String>> = vec![vec![start.clone()]];
        let mut seen = BTreeSet::new();
        while let Some(path) = stack.pop() {
            let last = path.last().unwrap();
            for next in &graph[last] {
                assert!(
                    next != start,
                    "import cycle: {} -> {next}\n{graph:#?}",
                    path.join(" -> ")
                );
                if seen.insert(next.clone()) {
                    let mut p = path.clone();
                    p.push(next.clone());
                    stack.push(p);
                }
            }
        }
    }
}

#[test]
fn the_object_a_node_runs_holds_no_benchmark_program() {
    let object = datapath_user::kernel::loader::OBJECT;
    let has = |needle: &[u8]| object.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"tc_encap_egress"), "not the datapath's object");
    for floor in [&b"tc_floor"[..], b"xdp_floor"] {
        assert!(
            !has(floor),
            "{} in the shipped object",
            String::from_utf8_lossy(floor)
        );
    }
}
