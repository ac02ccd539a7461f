//! The README's mounting snippet is the crate's doc example (compiled as a doc test), line for line.

#[test]
fn the_readme_snippet_is_the_compiled_doc_example() {
    let readme = include_str!("../../README.md");
    let docs = include_str!("../src/lib.rs");
    let snippet: Vec<&str> = docs
        .lines()
        .filter_map(|l| l.strip_prefix("//! "))
        .skip_while(|l| !l.starts_with("use emmett_seaorm_console::Console;"))
        .take_while(|l| !l.starts_with("axum::serve"))
        .chain(["axum::serve(listener, app).await"])
        .collect();
    let block = snippet.join("\n").replace("\n\n", "\n");
    let readme_block: String = readme
        .split("```text\nuse emmett_seaorm_console::Console;")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .map(|rest| format!("use emmett_seaorm_console::Console;{rest}"))
        .expect("the README's console snippet")
        .replace("\n\n", "\n");
    assert_eq!(readme_block.trim_end(), block.trim_end());
}
