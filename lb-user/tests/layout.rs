//! The shape of the source tree: imports between lb-user's top-level
//! modules point one way (no cycle), and so do `super::` paths between
//! the files of one folder; no source file grows past ~450 lines, and
//! `unsafe` appears only in the kernel-facing module.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

fn sources() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                out.push((p, text));
            }
        }
    }
    let mut v = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut v);
    assert!(v.len() > 20, "found only {} source files", v.len());
    v
}

/// The top-level module a file belongs to (`kernel` for src/kernel/maps.rs).
fn module_of(path: &Path) -> String {
    let rel = path.strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")).join("src")).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_owned()
}

/// Top-level modules named after `crate::` in `text` (uses and paths),
/// including those inside `use crate::{a::…, b::…}` groups.
fn references(text: &str) -> BTreeSet<String> {
    names_after(text, "crate::")
}

/// The names right after `prefix` in `text`, including those inside
/// `prefix{a::…, b::…}` groups; lowercase ones only (modules, not items).
fn names_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        rest = &rest[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{ a::x, b, c::{y, z} }`: the names at depth 1.
            let mut depth = 1;
            let mut at_start = true;
            for (j, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => at_start = true,
                    c if depth == 1 && at_start && !c.is_whitespace() => {
                        refs.insert(ident(&group[j..]));
                        at_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            refs.insert(ident(rest));
        }
    }
    refs.retain(|r| !r.is_empty() && r.chars().next().is_some_and(|c| c.is_ascii_lowercase()));
    refs
}

#[test]
fn imports_between_modules_point_one_way() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, text) in sources() {
        let m = module_of(&path);
        if m == "lib" || m == "main" {
            continue;
        }
        let refs = references(&text);
        let deps = graph.entry(m.clone()).or_default();
        deps.extend(refs.into_iter().filter(|r| *r != m && r != "EBPF_OBJECT"));
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle between modules: {}\ngraph: {graph:#?}", cycle.join(" -> "));
    }
}

/// A cycle in `graph`, whole, if it has one (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit<'a>(
        n: &'a str,
        g: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| *p == n) {
            return Some(path[i..].iter().map(|s| s.to_string()).chain([n.to_owned()]).collect());
        }
        if done.contains(n) {
            return None;
        }
        path.push(n);
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n);
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn imports_inside_folders_point_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    // Per folder: each file's module -> the sibling modules it names after
    // `super::` (a folder's mod.rs names its parent's, and is left out).
    let mut folders: BTreeMap<PathBuf, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (path, text) in sources() {
        let dir = path.parent().unwrap().to_owned();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if dir == src || name == "mod" {
            continue;
        }
        let siblings: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir() || p.extension().is_some_and(|x| x == "rs"))
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .filter(|n| n != "mod" && *n != name)
            .collect();
        let refs = names_after(&text, "super::").into_iter().filter(|r| siblings.contains(r)).collect();
        folders.entry(dir).or_default().insert(name, refs);
    }
    assert!(folders.len() >= 5, "found only {} folders", folders.len());
    for (dir, graph) in &folders {
        if let Some(cycle) = find_cycle(graph) {
            panic!("import cycle in {}: {}\ngraph: {graph:#?}", dir.display(), cycle.join(" -> "));
        }
    }
}

#[test]
fn the_cycle_check_sees_grouped_imports() {
    let r = references("use crate::{a::b, c, d::{e, f}};\nfn x() { crate::g::h(); }");
    assert_eq!(r, ["a", "c", "d", "g"].into_iter().map(String::from).collect());
}

#[test]
fn no_source_file_is_too_long() {
    for (path, text) in sources() {
        let lines = text.lines().count();
        assert!(lines <= 450, "{} has {lines} lines: split it by concern", path.display());
    }
}

#[test]
fn unsafe_only_in_the_kernel_module() {
    for (path, text) in sources() {
        if module_of(&path) == "kernel" {
            continue;
        }
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            assert!(!code.contains("unsafe"), "{}:{}: unsafe outside src/kernel: {line}", path.display(), i + 1);
        }
    }
}
