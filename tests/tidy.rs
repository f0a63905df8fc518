//! Tidy checks on the source tree (house style): every Rust file under
//! `src/` opens with a `//!` paragraph saying what it owns, and every module
//! file is named in ARCHITECTURE.md's codemap.

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
