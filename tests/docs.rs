//! The README shows code that is compiled and run, so it cannot drift.

/// The quick start in the README is `examples/quickstart.rs`, verbatim: the doc test compiles
/// it, `cargo run --example quickstart` runs it (`.ci/run` runs it twice).
#[test]
fn readme_quick_start_is_the_quickstart_example() {
    let readme = include_str!("../README.md");
    let example = include_str!("../examples/quickstart.rs");
    assert!(readme.contains(&format!("```rust,no_run\n{example}```")), "copy examples/quickstart.rs into the README");
}

/// No README snippet is left out of the doc tests.
#[test]
fn every_readme_rust_snippet_is_compiled() {
    let readme = include_str!("../README.md");
    assert!(!readme.contains("rust,ignore"), "README snippets are doc tests: use no_run, not ignore");
}
