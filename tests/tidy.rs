//! Tidy checks on the source tree (house style): every Rust file under
//! `src/` opens with a `//!` paragraph saying what it owns, and every module
//! file is named in ARCHITECTURE.md's codemap, and the Architecture
//! Invariants that a text search can check hold: only `store` names the
//! database crates, `todevice` and `e2ee` name nothing of HTTP, no `static` but the
//! metrics recorder (and one SQL constant), no `unwrap()`, no file over
//! 600 lines without a reason listed here, and no import circle between
//! modules but the ones in `KNOWN_CIRCLES`. It also keeps the Grafana
//! dashboard (`contrib/grafana/courier.json`) from naming a metric that
//! nothing in `src/` records.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn source_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    files.sort();
    assert!(files.len() > 10, "found the source tree");
    files
}

#[test]
fn every_source_file_opens_with_a_module_doc() {
    let missing: Vec<String> = source_files()
        .iter()
        .filter(|path| {
            let text = std::fs::read_to_string(path).expect("readable source file");
            !text.trim_start().starts_with("//!")
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "files without a //! header: {missing:?}"
    );
}

#[test]
fn every_module_is_in_the_codemap() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let codemap = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let missing: Vec<String> = source_files()
        .iter()
        .filter_map(|path| {
            let relative = path.strip_prefix(root.join("src")).expect("under src");
            let name = relative.to_string_lossy().replace('\\', "/");
            let stem = name.trim_end_matches(".rs").trim_end_matches("/mod");
            let file = name.rsplit('/').next().unwrap_or(&name);
            let parent = name.rsplit_once('/').map(|(dir, _)| dir);
            // Named by path, as a directory, or inside its directory's entry.
            let listed = codemap.contains(&format!("`{name}`"))
                || codemap.contains(&format!("`{stem}/"))
                || codemap.contains(&format!("`{stem}.rs"))
                || parent.is_some_and(|dir| {
                    (codemap.contains(&format!("`{dir}/`"))
                        || codemap.contains(&format!("`{dir}.rs`")))
                        && codemap.contains(&format!("`{file}`"))
                });
            let exempt = matches!(name.as_str(), "lib.rs" | "main.rs");
            (!listed && !exempt).then_some(name)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "modules missing from ARCHITECTURE.md's codemap: {missing:?}"
    );
}

/// `src/`-relative path (with `/`) and text of every source file.
fn sources() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    source_files()
        .into_iter()
        .map(|path| {
            let name = path
                .strip_prefix(&src)
                .expect("under src")
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(&path).expect("readable source file");
            (name, text)
        })
        .collect()
}

/// The lines of `text` that are code, not comments.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line))
        .filter(|(_, line)| !line.trim_start().starts_with("//"))
}

/// Every `file:line` of a code line outside `allowed` files that contains
/// one of `needles`.
fn offending(needles: &[&str], allowed: impl Fn(&str) -> bool) -> Vec<String> {
    let mut found = Vec::new();
    for (name, text) in sources() {
        if allowed(&name) {
            continue;
        }
        for (line_no, line) in code_lines(&text) {
            if needles.iter().any(|needle| line.contains(needle)) {
                found.push(format!("src/{name}:{line_no}: {}", line.trim()));
            }
        }
    }
    found
}

/// Architecture Invariant: only `store` knows SQL and the database crates.
#[test]
fn only_the_store_names_the_database_crates() {
    let found = offending(
        &["rusqlite", "tokio_postgres", "deadpool", "postgres_types"],
        |name| name.starts_with("store/"),
    );
    assert!(
        found.is_empty(),
        "database crates outside src/store/: {found:#?}"
    );
}

/// Architecture Invariant: Courier carries ciphertext and never encrypts or
/// decrypts; an Olm implementation is used only by the demo's client peers
/// (`src/tools/`, feature `demo-olm`).
#[test]
fn only_the_tools_name_an_olm_crate() {
    let found = offending(
        &["vodozemac", "matrix_sdk_crypto", "olm_rs", "libolm"],
        |name| name.starts_with("tools/"),
    );
    assert!(
        found.is_empty(),
        "Olm crates outside src/tools/: {found:#?}"
    );
}

/// Architecture Invariant: the domain cores (to-device and E2EE) know
/// nothing of HTTP (no HTTP crate, and not the Matrix error type of the
/// HTTP edge).
#[test]
fn the_domain_cores_name_no_http() {
    let found = offending(
        &["axum", "hyper", "http::", "crate::error", "StatusCode"],
        |name| !(name.starts_with("todevice/") || name.starts_with("e2ee/")),
    );
    assert!(
        found.is_empty(),
        "HTTP in src/todevice/ or src/e2ee/: {found:#?}"
    );
}

/// Architecture Invariant: no process globals but the metrics recorder,
/// which the `metrics` facade requires. (The SQL texts of the multi-row
/// inserts are `const`s, built by `concat!` at compile time.)
#[test]
fn no_static_outside_the_metrics_recorder() {
    let mut found = Vec::new();
    for (name, text) in sources() {
        for (line_no, line) in code_lines(&text) {
            let item = line.trim_start();
            let item = item
                .strip_prefix("pub(crate) ")
                .or_else(|| item.strip_prefix("pub "))
                .unwrap_or(item);
            let is_static = item.starts_with("static ");
            let allowed = name == "metrics.rs";
            if is_static && !allowed {
                found.push(format!("src/{name}:{line_no}: {}", line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "statics: {found:#?}");
}

/// House style: no `unwrap()` in `src/` (`expect("why")` where an
/// invariant rules failure out).
#[test]
fn no_unwrap_in_src() {
    let found = offending(&[".unwrap()"], |_| false);
    assert!(found.is_empty(), "unwrap() in src/: {found:#?}");
}

/// House style: files stay well under 600 lines; the few that do not say
/// why here, and a new one fails this test until it is split or listed.
#[test]
fn no_source_file_over_600_lines_without_a_listed_reason() {
    const LISTED: &[(&str, &str)] = &[
        (
            "config.rs",
            "one raw struct and one validation block per section; to be split per section in the re-layout",
        ),
        (
            "federation/inbound/transaction.rs",
            "the /send rules plus the borrowed-serde plumbing they parse with; the plumbing moves beside json.rs in the re-layout",
        ),
        (
            "store/mod.rs",
            "the Store trait: one documented method per domain operation, and their types",
        ),
        (
            "federation/keyring.rs",
            "one concept (remote keys: validation, memory, store, fetch, notaries) with its bounds",
        ),
        (
            "store/postgres/mod.rs",
            "the trait implementation for PostgreSQL: one delegating method per operation",
        ),
        (
            "federation/inbound/auth.rs",
            "the X-Matrix extractor's ordered checks, documented step by step, and their unit tests",
        ),
    ];
    let mut over = Vec::new();
    for (name, text) in sources() {
        let lines = text.lines().count();
        if lines > 600 && !LISTED.iter().any(|(listed, _)| *listed == name) {
            over.push(format!("src/{name}: {lines} lines"));
        }
    }
    assert!(
        over.is_empty(),
        "files over 600 lines without a reason in tests/tidy.rs: {over:?}"
    );
}

// ---- module imports form no circle ------------------------------------------

/// Import circles the tree still has, each with why it is allowed for now.
/// An entry lists the modules of one circle (its strongly connected
/// component); `a::*` stands for `a` and every module below it. The test
/// fails on any other circle, when a circle takes in a module its entry
/// does not name, and when a listed circle is gone (then delete its entry).
/// All of these are a directory's `mod.rs` that both holds items its
/// children use and calls or re-exports those children.
const KNOWN_CIRCLES: &[(&[&str], &str)] = &[
    (
        &[
            "store",
            "store::device_lists",
            "store::keys",
            "store::postgres::*",
            "store::sqlite::*",
        ],
        "mod.rs holds the Store trait the backends implement and `open` builds them; each backend's mod file holds what its per-table files share; keys.rs and device_lists.rs hold Store's supertraits KeyStore and DeviceListStore, whose futures and timestamps are mod.rs's",
    ),
    (
        &["todevice", "todevice::pack"],
        "pack.rs takes the EDU limits, SendRejected and new_message_id from todevice/mod.rs, which packs with it",
    ),
    (
        &[
            "tools::bench",
            "tools::bench::external",
            "tools::bench::in_process",
            "tools::bench::report",
        ],
        "bench/mod.rs holds BenchArgs, BenchError and run_workload for the two run modes it dispatches to, and re-exports report's types",
    ),
    (
        &[
            "tools::bench::receiver",
            "tools::bench::sender",
            "tools::bench::workload",
        ],
        "workload.rs holds Clock, Progress, Recipient and Workload and imports the sender and receiver tasks that use them",
    ),
];

/// Whether the circle `component` (sorted module paths) is the one `listed`
/// describes: every member named (exactly, or under an `a::*`), and every
/// exact name a member.
fn circle_is_listed(listed: &[&str], component: &[String]) -> bool {
    let covers = |pattern: &str, module: &str| match pattern.strip_suffix("::*") {
        Some(root) => module == root || module.starts_with(&format!("{root}::")),
        None => module == pattern,
    };
    component
        .iter()
        .all(|module| listed.iter().any(|pattern| covers(pattern, module)))
        && listed
            .iter()
            .filter(|pattern| !pattern.ends_with("::*"))
            .all(|pattern| component.iter().any(|module| module == pattern))
}

/// The module path of a `src/`-relative file: `federation/outbound/client.rs` is
/// `federation::outbound::client`, `store/mod.rs` is `store`, `lib.rs` is `` (the
/// crate root). `main.rs` is the binary, another crate: `None`.
fn module_path(name: &str) -> Option<String> {
    if name == "main.rs" {
        return None;
    }
    let stem = name.trim_end_matches(".rs");
    let stem = stem.strip_suffix("/mod").unwrap_or(stem);
    Some(if stem == "lib" {
        String::new()
    } else {
        stem.replace('/', "::")
    })
}

/// `text` with comments and the contents of string and char literals
/// replaced by spaces (newlines kept, so line numbers still hold).
fn strip_comments_and_literals(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0usize;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (i == 0 || !is_ident(chars[i - 1]) || chars[i - 1] == 'b')
            && matches!(next, Some('"') | Some('#'))
            && {
                let hashes = chars[i + 1..].iter().take_while(|&&h| h == '#').count();
                chars.get(i + 1 + hashes) == Some(&'"')
            }
        {
            let hashes = chars[i + 1..].iter().take_while(|&&h| h == '#').count();
            out.push('r');
            i += 1 + hashes + 1;
            out.push('"');
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i] == '"'
                    && chars[i + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&h| h == '#')
                        .count()
                        == hashes
                {
                    out.push('"');
                    i += 1 + hashes;
                    break;
                }
                out.push(blank(chars[i]));
                i += 1;
            }
        } else if c == '"' {
            out.push('"');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push('"');
            i += 1;
        } else if c == '\'' && next == Some('\\') {
            // An escaped char literal: '\n', '\'', '\u{..}'.
            out.push('\'');
            i += 2;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            out.push('\'');
            i += 1;
        } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
            out.push_str("' '");
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Parses a use tree (or a plain path) at `chars[*i..]` below `prefix`,
/// pushing every full path it names.
fn parse_use_tree(chars: &[char], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let skip_space = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    skip_space(i);
    match chars.get(*i) {
        Some('{') => {
            *i += 1;
            loop {
                skip_space(i);
                match chars.get(*i) {
                    None => return,
                    Some('}') => {
                        *i += 1;
                        return;
                    }
                    Some(',') => *i += 1,
                    Some(_) => {
                        let before = *i;
                        parse_use_tree(chars, i, prefix.clone(), out);
                        if *i == before {
                            *i += 1;
                        }
                    }
                }
            }
        }
        Some('*') => {
            *i += 1;
            out.push(prefix);
        }
        _ => {
            let start = *i;
            while *i < chars.len() && (chars[*i].is_alphanumeric() || chars[*i] == '_') {
                *i += 1;
            }
            let ident: String = chars[start..*i].iter().collect();
            if ident.is_empty() || ident == "self" {
                out.push(prefix);
                return;
            }
            let mut path = prefix;
            path.push(ident);
            if chars.get(*i) == Some(&':') && chars.get(*i + 1) == Some(&':') {
                *i += 2;
                parse_use_tree(chars, i, path, out);
            } else {
                out.push(path);
            }
        }
    }
}

/// One import of a module by another: where it is written.
#[derive(Debug, Clone)]
struct Import {
    file: String,
    line: usize,
}

/// The module graph: for every module (by path), the modules its code names
/// through `crate::`, `super::`, `self::` or a bare child-module path, with
/// the first place each is named. Declaring `mod b;` is not an edge, and a
/// module naming its own items is none either; inline modules (`mod tests`)
/// count as their file.
fn module_graph() -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, Import>>
{
    use std::collections::{BTreeMap, BTreeSet};
    let files: Vec<(String, String, String)> = sources()
        .into_iter()
        .filter_map(|(name, text)| module_path(&name).map(|module| (name, module, text)))
        .collect();
    let modules: BTreeSet<String> = files.iter().map(|(_, m, _)| m.clone()).collect();
    let split = |module: &str| -> Vec<String> {
        if module.is_empty() {
            Vec::new()
        } else {
            module.split("::").map(str::to_owned).collect()
        }
    };
    // The file module that owns a full path: its longest module prefix.
    let owner = |path: &[String]| -> String {
        (0..=path.len())
            .rev()
            .map(|n| path[..n].join("::"))
            .find(|candidate| modules.contains(candidate))
            .unwrap_or_default()
    };
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';

    let mut graph: BTreeMap<String, BTreeMap<String, Import>> = BTreeMap::new();
    for (name, module, text) in &files {
        let edges = graph.entry(module.clone()).or_default();
        let chars: Vec<char> = strip_comments_and_literals(text).chars().collect();
        let base = split(module);
        // Inline modules open at a brace depth: (name, depth before `{`).
        let mut inline: Vec<(String, usize)> = Vec::new();
        let mut depth = 0usize;
        let mut line = 1usize;
        let mut i = 0usize;
        while i < chars.len() {
            let c = chars[i];
            match c {
                '\n' => line += 1,
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if inline.last().is_some_and(|(_, at)| *at == depth) {
                        inline.pop();
                    }
                }
                _ => {}
            }
            let starts_word = is_ident(c)
                && (i == 0
                    || !(is_ident(chars[i - 1]) || chars[i - 1] == '$' || chars[i - 1] == ':'));
            if !starts_word {
                i += 1;
                continue;
            }
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if word == "mod" {
                // `mod name {` opens an inline module; `mod name;` declares a file.
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let name_start = j;
                while j < chars.len() && is_ident(chars[j]) {
                    j += 1;
                }
                let inner: String = chars[name_start..j].iter().collect();
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                if !inner.is_empty() && chars.get(j) == Some(&'{') {
                    inline.push((inner, depth));
                }
                continue;
            }
            let followed_by_path = chars.get(i) == Some(&':') && chars.get(i + 1) == Some(&':');
            if !followed_by_path {
                continue;
            }
            let mut here = base.clone();
            here.extend(inline.iter().map(|(n, _)| n.clone()));
            let mut prefix = match word.as_str() {
                "crate" => Vec::new(),
                "self" | "super" => here.clone(),
                _ => {
                    let mut child = base.clone();
                    child.push(word.clone());
                    if inline.is_empty() && modules.contains(&child.join("::")) {
                        child
                    } else {
                        continue;
                    }
                }
            };
            let mut j = i + 2;
            if word == "super" {
                prefix.pop();
                // `super::super::…`
                while chars[j..].starts_with(&['s', 'u', 'p', 'e', 'r', ':', ':']) {
                    prefix.pop();
                    j += 7;
                }
            }
            let mut paths = Vec::new();
            parse_use_tree(&chars, &mut j, prefix, &mut paths);
            // Skip the tree (its braces are balanced), counting its lines.
            let end = j.min(chars.len());
            line += chars[i..end].iter().filter(|&&c| c == '\n').count();
            i = end;
            for path in paths {
                let target = owner(&path);
                if target != *module {
                    edges.entry(target).or_insert_with(|| Import {
                        file: format!("src/{name}"),
                        line,
                    });
                }
            }
        }
    }
    graph
}

/// The strongly connected components of more than one module (Tarjan).
fn circles(
    graph: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, Import>>,
) -> Vec<Vec<String>> {
    struct Walk<'g> {
        graph: &'g std::collections::BTreeMap<String, std::collections::BTreeMap<String, Import>>,
        index: std::collections::HashMap<&'g str, (usize, usize)>,
        stack: Vec<&'g str>,
        on_stack: std::collections::HashSet<&'g str>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    impl<'g> Walk<'g> {
        fn visit(&mut self, node: &'g str) {
            self.index.insert(node, (self.next, self.next));
            self.next += 1;
            self.stack.push(node);
            self.on_stack.insert(node);
            let targets = self
                .graph
                .get(node)
                .into_iter()
                .flat_map(|edges| edges.keys());
            for target in targets {
                let target = target.as_str();
                if !self.index.contains_key(target) {
                    self.visit(target);
                    let low = self.index[target].1.min(self.index[node].1);
                    self.index.get_mut(node).expect("visited").1 = low;
                } else if self.on_stack.contains(target) {
                    let low = self.index[target].0.min(self.index[node].1);
                    self.index.get_mut(node).expect("visited").1 = low;
                }
            }
            let (index, low) = self.index[node];
            if index == low {
                let mut component = Vec::new();
                while let Some(member) = self.stack.pop() {
                    self.on_stack.remove(member);
                    component.push(member.to_owned());
                    if member == node {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: Default::default(),
        stack: Vec::new(),
        on_stack: Default::default(),
        next: 0,
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !walk.index.contains_key(node.as_str()) {
            walk.visit(node);
        }
    }
    walk.found.sort();
    walk.found
}

/// One concrete cycle through `component`, each step with where the import
/// is written, for the failure message.
fn describe_circle(
    graph: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, Import>>,
    component: &[String],
) -> String {
    let inside = |m: &str| component.iter().any(|c| c == m);
    let start = &component[0];
    // Breadth-first from `start` inside the component, back to `start`.
    let mut came_from: std::collections::HashMap<String, String> = Default::default();
    let mut queue = std::collections::VecDeque::from([start.clone()]);
    let mut last = None;
    'search: while let Some(node) = queue.pop_front() {
        for target in graph.get(&node).into_iter().flat_map(|e| e.keys()) {
            if target == start {
                last = Some(node.clone());
                break 'search;
            }
            if inside(target) && !came_from.contains_key(target) {
                came_from.insert(target.clone(), node.clone());
                queue.push_back(target.clone());
            }
        }
    }
    let mut chain = Vec::new();
    let mut node = last.unwrap_or_else(|| start.clone());
    while node != *start {
        chain.push(node.clone());
        node = came_from
            .get(&node)
            .cloned()
            .unwrap_or_else(|| start.clone());
    }
    chain.reverse();
    let mut path = vec![start.clone()];
    path.extend(chain);
    path.push(start.clone());
    let steps: Vec<String> = path
        .windows(2)
        .map(|pair| {
            let at = &graph[&pair[0]][&pair[1]];
            format!("  {} -> {} ({}:{})", pair[0], pair[1], at.file, at.line)
        })
        .collect();
    format!("circle {component:?}:\n{}", steps.join("\n"))
}

/// The graph sees the imports it must: `use` lines, grouped trees,
/// `super::`, bare child paths and paths in code. Without this the circle
/// test could pass on a parser that finds nothing.
#[test]
fn the_module_graph_sees_the_imports() {
    let graph = module_graph();
    let has = |from: &str, to: &str| graph.get(from).is_some_and(|edges| edges.contains_key(to));
    for (from, to) in [
        (
            "federation::outbound::client",
            "federation::outbound::connector",
        ),
        (
            "federation::outbound::client",
            "federation::outbound::client_error",
        ),
        ("federation::keyring", "store"),
        ("keys", "signing"),
        ("store::pruner", "store"),
        ("store::postgres::lease", "store::postgres::outbox"),
        ("store::postgres", "store::postgres::tls"),
        (
            "federation::outbound::client",
            "federation::sender::transaction",
        ),
    ] {
        assert!(
            has(from, to),
            "no edge {from} -> {to}: {:?}",
            graph.get(from)
        );
    }
    assert!(
        !has("keys", "keys"),
        "a module naming its own items is no edge"
    );
    let edges: usize = graph.values().map(|e| e.len()).sum();
    assert!(edges > 100, "only {edges} imports found");
}

/// The circle finder on a small graph: `a -> b -> c -> a` is one circle,
/// reported with each step; `d -> a` outside it and the acyclic `e -> f`
/// are not.
#[test]
fn a_circle_is_found_and_described() {
    let at = |line| Import {
        file: "src/x.rs".to_owned(),
        line,
    };
    let mut graph: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Import>> =
        Default::default();
    for (line, (from, to)) in [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a"), ("e", "f")]
        .into_iter()
        .enumerate()
    {
        graph
            .entry(from.to_owned())
            .or_default()
            .insert(to.to_owned(), at(line + 1));
    }
    let found = circles(&graph);
    assert_eq!(
        found,
        vec![vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]]
    );
    let text = describe_circle(&graph, &found[0]);
    for step in [
        "a -> b (src/x.rs:1)",
        "b -> c (src/x.rs:2)",
        "c -> a (src/x.rs:3)",
    ] {
        assert!(text.contains(step), "{text}");
    }
    assert!(circle_is_listed(&["a", "b", "c"], &found[0]));
    assert!(circle_is_listed(&["a", "b::*", "c"], &found[0]));
    assert!(!circle_is_listed(&["a", "b"], &found[0]), "c is not named");
    assert!(
        !circle_is_listed(&["a", "b", "c", "d"], &found[0]),
        "d is no member"
    );
}

/// Architecture Invariant: module imports form no circle (but the ones
/// listed in `KNOWN_CIRCLES`, each with its reason).
#[test]
fn module_imports_form_no_circle() {
    let graph = module_graph();
    let found = circles(&graph);
    let unlisted: Vec<String> = found
        .iter()
        .filter(|component| {
            !KNOWN_CIRCLES
                .iter()
                .any(|(listed, _)| circle_is_listed(listed, component))
        })
        .map(|component| describe_circle(&graph, component))
        .collect();
    let stale: Vec<&[&str]> = KNOWN_CIRCLES
        .iter()
        .map(|(listed, _)| *listed)
        .filter(|listed| {
            !found
                .iter()
                .any(|component| circle_is_listed(listed, component))
        })
        .collect();
    assert!(
        unlisted.is_empty(),
        "import circles between modules (open them, or list one in KNOWN_CIRCLES with a reason):\n{}",
        unlisted.join("\n")
    );
    assert!(
        stale.is_empty(),
        "KNOWN_CIRCLES entries that are no longer circles (delete them): {stale:?}"
    );
}

/// Architecture Invariant: the relay does not depend on the developer
/// tools; only `cli.rs` (which dispatches the tools' subcommands) and the
/// tools themselves name `crate::tools`.
#[test]
fn nothing_in_the_relay_imports_the_tools() {
    let found = offending(&["crate::tools"], |name| {
        name.starts_with("tools/") || name == "cli.rs" || name == "main.rs"
    });
    assert!(found.is_empty(), "the relay names the tools: {found:#?}");
}

/// Metric names the Grafana dashboard may use before any file in `src/`
/// records them (a counter another branch is adding). Remove an entry once
/// `src/` has it.
const METRICS_NOT_YET_IN_SRC: &[&str] = &[];

/// Every `courier_…` identifier in `text` (a PromQL expression).
fn courier_identifiers(text: &str) -> Vec<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = Vec::new();
    for (at, _) in text.match_indices("courier_") {
        if text[..at].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let name: String = text[at..].chars().take_while(|&c| is_ident(c)).collect();
        out.push(name);
    }
    out
}

/// Every PromQL string of a dashboard: panel targets' `expr` and the
/// template variables' queries.
fn dashboard_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "query" | "definition", serde_json::Value::String(text)) => {
                        out.push(text.clone())
                    }
                    _ => dashboard_queries(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

#[test]
fn the_grafana_dashboard_uses_only_metrics_that_courier_records() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("contrib/grafana/courier.json"))
        .expect("contrib/grafana/courier.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    // The names Courier records: every "courier_…" string literal in src/
    // (the metrics macros' names and the one constant holding a name).
    let mut known = std::collections::BTreeSet::new();
    for (_, source) in sources() {
        for (at, _) in source.match_indices("\"courier_") {
            let name: String = source[at + 1..]
                .chars()
                .take_while(|&c| c.is_ascii_alphanumeric() || c == '_')
                .collect();
            known.insert(name);
        }
    }
    assert!(
        known.len() > 20,
        "found the metric names in src/: {known:?}"
    );
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    let used: std::collections::BTreeSet<String> = queries
        .iter()
        .flat_map(|q| courier_identifiers(q))
        .collect();
    assert!(
        used.len() > 20,
        "the dashboard's queries were found: {used:?}"
    );
    let unknown: Vec<&String> = used
        .iter()
        .filter(|name| !known.contains(*name) && !METRICS_NOT_YET_IN_SRC.contains(&name.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "contrib/grafana/courier.json uses metrics that nothing in src/ records: {unknown:?}"
    );
    // The data source is the dashboard's variable, so it imports anywhere.
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {} names a fixed data source",
            panel["title"]
        );
    }
    assert!(
        dashboard["templating"]["list"]
            .as_array()
            .expect("templating")
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus data source variable"
    );
}

#[test]
fn courier_identifiers_are_read_whole_and_only_at_a_word_start() {
    assert_eq!(
        courier_identifiers(
            r#"sum by (x) (rate(courier_a_total{y="courier_b"}[5m])) / my_courier_c"#
        ),
        vec!["courier_a_total", "courier_b"]
    );
}
