//! The demo page at `/`: served as HTML by every node, with a script that parses.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_is_served_and_its_script_parses() {
    let gw = Gateway::start(None, &[]);
    let resp = reqwest::get(gw.url("/")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = resp.text().await.unwrap();
    for needle in ["EventSource", "WebSocket", "/poll?channel=", "/api/publish", "textContent"] {
        assert!(html.contains(needle), "demo page uses {needle}");
    }
    let start = html.find("<script>").expect("inline script") + "<script>".len();
    let end = html[start..].find("</script>").unwrap() + start;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("demo.js");
    std::fs::write(&path, &html[start..end]).unwrap();
    // Node ships with the development machines and CI; its syntax check is the strictest
    // test of the page's script short of a browser.
    match std::process::Command::new("node").arg("--check").arg(&path).output() {
        Ok(out) => assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => eprintln!("node not found ({e}); skipped the script syntax check"),
    }
}
