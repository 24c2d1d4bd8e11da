//! The import graph checked against the order `lib.rs` and README's Layout state: a module uses
//! only modules below it, the roles never use each other, and no two files of one folder use
//! each other (directly or round a loop). Read from the source text: the `crate::` paths of the
//! code that is not a test (a file's tests start at its first `#[cfg(test)]`), and for sibling
//! files their `super::` paths.

use std::collections::{BTreeMap, BTreeSet};

/// The top-level modules, top to bottom. A module may use those of lower layers only.
pub const LAYERS: &[&[&str]] = &[
    &["cli"],
    // The roles: the operator, search, and the data-plane commands.
    &["controller", "serve", "commands"],
    &["config", "crd", "telemetry", "sync"],
    // An index and its generations, over the adapters.
    &["index"],
    // The leaves: none uses another.
    &["embed", "store", "bucket"],
    &["core", "contract"],
];

/// What the operator's side may use: it runs no data-plane code (it talks to the data plane
/// through `contract`: the pods' environment, the Jobs' reports, the exit codes).
pub const CONTROL_PLANE: &[(&str, &[&str])] =
    &[("controller", &["crd", "core", "contract", "telemetry"]), ("crd", &["core", "contract"])];

/// One source file: its path under `src/` (`store/catalog/plans.rs`) and its text.
pub struct File {
    pub path: String,
    pub text: String,
}

/// Every arrow that breaks the order, and every loop of sibling files, as sentences.
pub fn violations(files: &[File]) -> Vec<String> {
    let layer = |m: &str| LAYERS.iter().position(|l| l.contains(&m));
    let mut out = Vec::new();
    let mut siblings: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    // A `tests.rs` is a test module in a file of its own (`#[cfg(test)] mod tests;`): test code.
    for f in files.iter().filter(|f| !f.path.ends_with("/tests.rs")) {
        let code = code_of(&f.text);
        let top = f.path.split(['/', '.']).next().unwrap_or_default().to_string();
        let Some(from) = layer(&top) else { continue };
        for used in crate_paths(&code) {
            let first = used.split("::").next().unwrap_or_default();
            if first == top {
                continue;
            }
            if layer(first).is_some_and(|to| to <= from) {
                out.push(format!("{}: uses `crate::{used}`, which is not below `{top}`", f.path));
            }
            let allowed = CONTROL_PLANE.iter().find(|(m, _)| *m == top).map(|(_, a)| *a);
            if allowed.is_some_and(|a| layer(first).is_some() && !a.contains(&first)) {
                out.push(format!("{}: the control plane uses the data plane's `crate::{used}`", f.path));
            }
        }
        // Sibling files: `dir/a.rs` using `super::b` where `dir/b.rs` or `dir/b/` exists.
        if let Some((dir, name)) = f.path.rsplit_once('/') {
            let name = name.trim_end_matches(".rs");
            if name != "mod" {
                let uses: BTreeSet<String> = super_paths(&code).into_iter().collect();
                siblings.entry(dir.to_string()).or_default().insert(name.to_string(), uses);
            }
        }
    }
    for (dir, graph) in &siblings {
        let names: BTreeSet<&String> = graph.keys().collect();
        let edges: BTreeMap<&str, Vec<&str>> = graph
            .iter()
            .map(|(n, uses)| {
                (n.as_str(), uses.iter().filter(|u| names.contains(u) && *u != n).map(String::as_str).collect())
            })
            .collect();
        if let Some(cycle) = find_cycle(&edges) {
            out.push(format!("{dir}/: a loop of files that use each other: {}", cycle.join(" -> ")));
        }
    }
    out
}

/// The code that is not a test, without comments.
fn code_of(text: &str) -> String {
    let end = text.find("#[cfg(test)]").unwrap_or(text.len());
    text[..end].lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// The first segments after every `crate::` (`index::Index`, or each of `crate::{a, b::c}`).
fn crate_paths(code: &str) -> Vec<String> {
    paths_after(code, "crate::")
}

/// The first segment after every `super::` (each of `super::{a, b}`).
fn super_paths(code: &str) -> Vec<String> {
    paths_after(code, "super::").into_iter().map(|p| p.split("::").next().unwrap_or_default().to_string()).collect()
}

fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect::<String>();
    let mut out = Vec::new();
    for (i, _) in code.match_indices(prefix) {
        // Not the tail of a longer path (`imageindex_crate::`).
        if code[..i].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut item) = (0, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => out.push(std::mem::take(&mut item)),
                    _ if depth == 0 => item.push(c),
                    _ => {}
                }
            }
            out.push(item);
        } else {
            out.push(ident(rest));
        }
    }
    out.into_iter().map(|p| ident(p.trim()).trim_end_matches(':').to_string()).filter(|p| !p.is_empty()).collect()
}

/// Files of one top-level module (a role, or a layer's module) that share a name (`mod.rs` aside):
/// two `tasks.rs` in one role are two places a reader must tell apart by their folder.
pub fn shared_names(files: &[File]) -> Vec<String> {
    let mut seen: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for f in files {
        let (Some((top, _)), Some(name)) = (f.path.split_once('/'), f.path.rsplit('/').next()) else { continue };
        if name != "mod.rs" {
            seen.entry((top, name)).or_default().push(&f.path);
        }
    }
    seen.into_iter()
        .filter(|(_, paths)| paths.len() > 1)
        .map(|((top, name), paths)| format!("{top}/: {} files named {name}: {}", paths.len(), paths.join(", ")))
        .collect()
}

/// A loop in the graph, if it has one: its nodes in order, the first repeated at the end.
fn find_cycle<'a>(edges: &BTreeMap<&'a str, Vec<&'a str>>) -> Option<Vec<&'a str>> {
    fn visit<'a>(
        n: &'a str,
        edges: &BTreeMap<&'a str, Vec<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(at) = path.iter().position(|p| *p == n) {
            let mut cycle = path[at..].to_vec();
            cycle.push(n);
            return Some(cycle);
        }
        if !done.insert(n) {
            return None;
        }
        path.push(n);
        for next in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    edges.keys().find_map(|n| visit(n, edges, &mut Vec::new(), &mut done))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> Vec<File> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let rel = path.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
                    files.push(File { path: rel, text: std::fs::read_to_string(&path).unwrap() });
                }
            }
        }
        files
    }

    fn file(path: &str, text: &str) -> File {
        File { path: path.into(), text: text.into() }
    }

    #[test]
    fn every_arrow_points_down_and_no_files_loop() {
        let files = tree();
        assert!(files.len() > 40, "read the tree: {} files", files.len());
        let bad = violations(&files);
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    #[test]
    fn no_two_files_of_one_module_share_a_name() {
        let shared = shared_names(&tree());
        assert!(shared.is_empty(), "{}", shared.join("\n"));
        let twice =
            [file("controller/tasks.rs", ""), file("controller/reconcile/tasks.rs", ""), file("sync/tasks.rs", "")];
        assert_eq!(
            shared_names(&twice),
            ["controller/: 2 files named tasks.rs: controller/tasks.rs, controller/reconcile/tasks.rs"]
        );
        assert!(shared_names(&[file("serve/mod.rs", ""), file("serve/a/mod.rs", "")]).is_empty());
    }

    #[test]
    fn an_arrow_up_a_role_using_a_role_and_a_loop_are_each_found() {
        let up = file("store/milvus.rs", "use crate::sync::plan;\nfn f() { crate::core::x(); }");
        assert_eq!(violations(&[up]).len(), 1);
        let grouped = file("embed/model.rs", "use crate::{core::ModelId, index::Index};");
        assert_eq!(violations(&[grouped]).len(), 1, "found inside a use group");
        let role = file("serve/routes.rs", "use crate::commands::plan;");
        assert_eq!(violations(&[role]).len(), 1, "roles never use each other");
        let data = file("controller/builders.rs", "use crate::store::key_id;");
        assert_eq!(violations(&[data]).len(), 1, "the control plane uses no data plane");
        let tested = file("store/milvus.rs", "fn f() {}\n#[cfg(test)]\nmod tests { use crate::sync::plan; }");
        let test_file = file("store/milvus/tests.rs", "use crate::sync::plan;");
        let commented = file("store/milvus.rs", "/// Read by `crate::sync::plan`.\nfn f() {}");
        assert!(violations(&[tested, test_file, commented]).is_empty(), "tests and comments are not arrows");
        let a = file("controller/reconcile/a.rs", "use super::b::X;");
        let b = file("controller/reconcile/b.rs", "use super::{c, mod_item};");
        let c = file("controller/reconcile/c.rs", "fn f() { super::a::g(); }");
        let found = violations(&[a, b, c]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("a -> b -> c -> a"), "{found:?}");
    }
}
