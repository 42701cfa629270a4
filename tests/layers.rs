//! The shape of `src/`, checked: no two files import each other, directly
//! or around a circle, and the cluster's layers import only downwards.
//!
//! Every `crate::`, `super::` and `self::` path in a file, and every path
//! that starts with a name such a `use` brought in, is resolved to the
//! file that defines it (following `pub use` re-exports). A module using
//! what its own parent (or any ancestor) defines is not an import in this
//! sense: the parent contains it. Tests are left out: they may reach
//! across layers to set a scene.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

type ModPath = Vec<String>;

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| match &a.meta {
        syn::Meta::List(list) if list.path.is_ident("cfg") => {
            // Whole words: `netns_tests` is not `test`.
            let text = list.tokens.to_string();
            let words: Vec<&str> = text
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .collect();
            words.contains(&"test") && !words.contains(&"not")
        }
        _ => false,
    })
}

/// Every leaf of a `use` tree as (full path, name it binds; `None` for
/// a glob).
fn use_leaves(tree: &syn::UseTree, prefix: &mut ModPath, out: &mut Vec<(ModPath, Option<String>)>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_leaves(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let name = n.ident.to_string();
            if name == "self" {
                out.push((prefix.clone(), prefix.last().cloned()));
            } else {
                let mut full = prefix.clone();
                full.push(name.clone());
                out.push((full, Some(name)));
            }
        }
        syn::UseTree::Rename(r) => {
            let mut full = prefix.clone();
            let ident = r.ident.to_string();
            if ident != "self" {
                full.push(ident);
            }
            out.push((full, Some(r.rename.to_string())));
        }
        syn::UseTree::Glob(_) => out.push((prefix.clone(), None)),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                use_leaves(t, prefix, out);
            }
        }
    }
}

/// The paths a file's code names, with test-only items left out.
#[derive(Default)]
struct Paths {
    uses: Vec<(ModPath, Option<String>, bool)>,
    named: Vec<ModPath>,
    children: BTreeSet<String>,
}

impl<'a> Visit<'a> for Paths {
    fn visit_item(&mut self, item: &'a syn::Item) {
        let attrs: &[syn::Attribute] = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Struct(s) => &s.attrs,
            syn::Item::Enum(e) => &e.attrs,
            syn::Item::Const(c) => &c.attrs,
            syn::Item::Static(s) => &s.attrs,
            syn::Item::Trait(t) => &t.attrs,
            syn::Item::Type(t) => &t.attrs,
            _ => &[],
        };
        if let syn::Item::Mod(m) = item {
            if is_test_only(attrs) {
                return;
            }
            self.children.insert(m.ident.to_string());
        }
        if is_test_only(attrs) {
            return;
        }
        if let syn::Item::Use(u) = item {
            let public = !matches!(u.vis, syn::Visibility::Inherited);
            let mut leaves = Vec::new();
            use_leaves(&u.tree, &mut Vec::new(), &mut leaves);
            for (path, name) in leaves {
                self.uses.push((path, name, public));
            }
            return;
        }
        syn::visit::visit_item(self, item);
    }

    fn visit_path(&mut self, path: &'a syn::Path) {
        if path.leading_colon.is_none() && path.segments.len() > 1 {
            self.named
                .push(path.segments.iter().map(|s| s.ident.to_string()).collect());
        }
        syn::visit::visit_path(self, path);
    }
}

struct Tree {
    files: BTreeMap<ModPath, PathBuf>,
    paths: HashMap<ModPath, Paths>,
}

impl Tree {
    /// The library's files, found as the compiler finds them: from
    /// `lib.rs` down its `mod` declarations (test-only ones left out).
    fn load() -> Tree {
        let mut tree = Tree {
            files: BTreeMap::new(),
            paths: HashMap::new(),
        };
        let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs");
        tree.add(Vec::new(), lib);
        tree
    }

    fn add(&mut self, module: ModPath, file: PathBuf) {
        let text = std::fs::read_to_string(&file).unwrap();
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let mut seen = Paths::default();
        seen.visit_file(&ast);
        let dir = file.parent().unwrap();
        let stem = file.file_stem().unwrap();
        // `a.rs` keeps its children in `a/`; `mod.rs` and `lib.rs` beside
        // themselves.
        let own_dir = if stem == "mod" || stem == "lib" {
            dir.to_path_buf()
        } else {
            dir.join(stem)
        };
        let mut children: Vec<(ModPath, PathBuf)> = Vec::new();
        for item in &ast.items {
            let syn::Item::Mod(m) = item else { continue };
            if m.content.is_some() || is_test_only(&m.attrs) {
                continue;
            }
            let name = m.ident.to_string();
            let explicit = m.attrs.iter().find_map(|a| match &a.meta {
                syn::Meta::NameValue(nv) if nv.path.is_ident("path") => match &nv.value {
                    syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Str(s),
                        ..
                    }) => Some(dir.join(s.value())),
                    _ => None,
                },
                _ => None,
            });
            let path = explicit.unwrap_or_else(|| {
                let flat = own_dir.join(format!("{name}.rs"));
                if flat.exists() {
                    flat
                } else {
                    own_dir.join(&name).join("mod.rs")
                }
            });
            let mut child = module.clone();
            child.push(name);
            children.push((child, path));
        }
        self.files.insert(module.clone(), file);
        self.paths.insert(module, seen);
        for (child, path) in children {
            self.add(child, path);
        }
    }

    /// `path`, written in `module`, as an absolute path; `None` when it
    /// names something outside the crate.
    fn absolute(&self, module: &ModPath, path: &[String], depth: usize) -> Option<ModPath> {
        let (first, rest) = path.split_first()?;
        let mut base = match first.as_str() {
            "crate" => Vec::new(),
            "self" => module.clone(),
            "super" => {
                let mut m = module.clone();
                m.pop();
                let mut rest = rest;
                while let Some(("super", more)) = rest.split_first().map(|(s, m)| (s.as_str(), m)) {
                    m.pop();
                    rest = more;
                }
                m.extend(rest.iter().cloned());
                return Some(m);
            }
            name => {
                let seen = self.paths.get(module)?;
                if seen.children.contains(name) {
                    let mut m = module.clone();
                    m.push(name.to_string());
                    m
                } else if depth < 8 {
                    let (full, _, _) = seen
                        .uses
                        .iter()
                        .find(|(_, bound, _)| bound.as_deref() == Some(name))?;
                    self.absolute(module, full, depth + 1)?
                } else {
                    return None;
                }
            }
        };
        base.extend(rest.iter().cloned());
        Some(base)
    }

    /// The module that defines what an absolute path names, following
    /// `pub use` re-exports.
    fn defining(&self, path: &ModPath, depth: usize) -> Option<ModPath> {
        let known = (0..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|m| self.files.contains_key(m))?;
        if depth < 8 {
            if let Some(item) = path.get(known.len()) {
                let seen = &self.paths[&known];
                let reexport = seen
                    .uses
                    .iter()
                    .find(|(_, bound, public)| *public && bound.as_deref() == Some(item.as_str()));
                if let Some((full, _, _)) = reexport {
                    let mut target = self.absolute(&known, full, 0)?;
                    target.extend(path[known.len() + 1..].iter().cloned());
                    return self.defining(&target, depth + 1);
                }
            }
        }
        Some(known)
    }

    /// Which files each file imports from, with the path that shows it.
    fn imports(&self) -> BTreeMap<ModPath, BTreeMap<ModPath, String>> {
        let mut out: BTreeMap<ModPath, BTreeMap<ModPath, String>> = BTreeMap::new();
        for (module, seen) in &self.paths {
            let written = seen.uses.iter().map(|(p, _, _)| p).chain(&seen.named);
            for path in written {
                let Some(abs) = self.absolute(module, path, 0) else {
                    continue;
                };
                let Some(target) = self.defining(&abs, 0) else {
                    continue;
                };
                // Within itself, or into what it contains: not an import.
                if target.starts_with(module) || module.starts_with(&target) {
                    continue;
                }
                out.entry(module.clone())
                    .or_default()
                    .entry(target)
                    .or_insert_with(|| path.join("::"));
            }
        }
        out
    }
}

fn name(m: &ModPath) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// Strongly connected sets of more than one file (Tarjan's algorithm).
fn circles(edges: &BTreeMap<ModPath, BTreeMap<ModPath, String>>) -> Vec<Vec<ModPath>> {
    struct State<'a> {
        edges: &'a BTreeMap<ModPath, BTreeMap<ModPath, String>>,
        index: HashMap<&'a ModPath, usize>,
        low: HashMap<&'a ModPath, usize>,
        stack: Vec<&'a ModPath>,
        on_stack: BTreeSet<&'a ModPath>,
        found: Vec<Vec<ModPath>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a ModPath) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(next) = s.edges.get(v) {
            for w in next.keys() {
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if s.on_stack.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut set = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on_stack.remove(w);
                set.push(w.clone());
                if w == v {
                    break;
                }
            }
            if set.len() > 1 {
                set.sort();
                s.found.push(set);
            }
        }
    }
    let mut s = State {
        edges,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.found
}

#[test]
fn no_file_imports_from_a_file_that_imports_it_back() {
    let tree = Tree::load();
    assert!(tree.files.len() > 50, "the source tree was found");
    let edges = tree.imports();
    let found = circles(&edges);
    let mut report = String::new();
    for set in &found {
        report.push_str("circle:\n");
        for a in set {
            for (b, shown) in &edges[a] {
                if set.contains(b) {
                    report.push_str(&format!("  {} -> {} ({shown})\n", name(a), name(b)));
                }
            }
        }
    }
    assert!(found.is_empty(), "{} import circles\n{report}", found.len());
}

/// The cluster's layers, lowest first; the root's files come last.
const CLUSTER_LAYERS: &[&str] = &[
    "identity",
    "link",
    "state",
    "rpc",
    "raft",
    "membership",
    "groups",
    "service",
    "handle",
    "node",
];

#[test]
fn the_clusters_layers_import_only_downwards() {
    let tree = Tree::load();
    let layer = |m: &ModPath| -> Option<usize> {
        if m.first().map(String::as_str) != Some("cluster") {
            return None;
        }
        let top = m.get(1)?;
        Some(
            CLUSTER_LAYERS
                .iter()
                .position(|l| l == top)
                .unwrap_or_else(|| panic!("cluster::{top} is in no layer")),
        )
    };
    let mut upward = Vec::new();
    for (from, targets) in tree.imports() {
        let Some(low) = layer(&from) else { continue };
        for (to, shown) in targets {
            if let Some(high) = layer(&to) {
                if high > low {
                    upward.push(format!("{} -> {} ({shown})", name(&from), name(&to)));
                }
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports up the layers:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_checker_sees_a_circle() {
    // Two modules naming each other, and the resolver's cases: a `use`
    // alias, `super::`, a re-export.
    let a: syn::File = syn::parse_quote! {
        use super::b::Thing;
        pub use self::inner::Item;
        mod inner { pub struct Item; }
        fn f(_: Thing) {}
    };
    let b: syn::File = syn::parse_quote! {
        use crate::top;
        fn g(_: top::a::Item) {}
        #[cfg(test)]
        fn h(_: crate::top::c::Other) {}
    };
    let c: syn::File = syn::parse_quote! { pub struct Other; };
    let mut files = BTreeMap::new();
    let mut paths = HashMap::new();
    for (m, ast) in [("a", a), ("b", b), ("c", c)] {
        let module = vec!["top".to_string(), m.to_string()];
        let mut seen = Paths::default();
        seen.visit_file(&ast);
        files.insert(module.clone(), PathBuf::from(m));
        paths.insert(module, seen);
    }
    let tree = Tree { files, paths };
    let edges = tree.imports();
    let top = |m: &str| vec!["top".to_string(), m.to_string()];
    assert_eq!(circles(&edges), vec![vec![top("a"), top("b")]]);
    assert!(
        !edges[&top("b")].contains_key(&top("c")),
        "test-only paths are left out"
    );
}

#[test]
fn only_cfg_test_marks_a_module_test_only() {
    let only = |item: syn::ItemMod| is_test_only(&item.attrs);
    assert!(only(syn::parse_quote! { #[cfg(test)] mod a; }));
    assert!(only(syn::parse_quote! { #[cfg(all(test, unix))] mod a; }));
    assert!(!only(syn::parse_quote! { #[cfg(netns_tests)] mod a; }));
    assert!(!only(syn::parse_quote! { #[cfg(not(test))] mod a; }));
    assert!(!only(syn::parse_quote! { mod a; }));
}
