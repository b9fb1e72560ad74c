//! The `upstream-model` binary: prints its address, serves, honours its flags.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_prints_its_address_and_serves() {
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_upstream-model"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--slots",
                "1",
                "--token-ms",
                "1",
                "--tokens",
                "3",
                "--no-host-check",
                // llama-server's habits (their effect is tested in-process).
                "--ignore-disconnect-non-streaming",
                "--disconnect-notice-ms",
                "0",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn upstream-model"),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("upstream-model listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let addr: std::net::SocketAddr = url.parse().unwrap();
    let r = send(addr, "GET", "/", &[("host", "example.com")], "").await;
    assert_eq!(text(r).await, "Ollama is running");
    let r = post(
        addr,
        "/api/generate",
        &[],
        r#"{"model":"fake","prompt":"x"}"#,
    )
    .await;
    let lines = ndjson(&text(r).await);
    assert_eq!(lines.len(), 4);
    let v = json(get(addr, "/_fake/stats").await).await;
    assert_eq!(v["slots"], 1);
}
