//! Runs the TypeScript side of the interop tests (`interop/*.mjs`) in Node.js.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

/// Installs the TypeScript package (the versions `interop/package-lock.json` pins) when
/// `interop/node_modules` lacks it: once per test process, however many tests ask at once.
fn install(dir: &Path) {
    static INSTALLED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if *installed || dir.join("node_modules/@wataruoguchi/emmett-event-store-kysely").exists() {
        *installed = true;
        return;
    }
    let how = "Install Node.js and npm (scripts/services does), or run `npm ci --prefix interop`.";
    let ci = Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(dir).output();
    match ci {
        Ok(done) if done.status.success() => *installed = true,
        Ok(done) => super::unavailable("the TypeScript package", String::from_utf8_lossy(&done.stderr), how),
        Err(err) => super::unavailable("npm", err, how),
    }
}

/// Runs `node <script> <args>` in `interop/` with `env`, writing `input` as JSON to its stdin;
/// what it printed, as JSON. Fails saying what to do when Node.js or the package is missing.
pub fn run(script: &str, args: &[&str], env: &[(&str, &str)], input: Option<&Value>) -> Value {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop");
    install(&dir);
    let mut node = match Command::new("node")
        .arg(script)
        .args(args)
        .current_dir(&dir)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(node) => node,
        Err(err) => super::unavailable("node", err, "Install Node.js, then `npm ci --prefix interop`."),
    };
    let input = input.map(|v| serde_json::to_vec(v).unwrap()).unwrap_or_default();
    let mut stdin = node.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = node.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{script} {args:?} failed: {stderr}");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{script} {args:?} printed no JSON ({e}): {stderr}"))
}
