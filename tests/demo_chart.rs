//! `duet demo` (the network demo, across namespaces it makes itself) keeps
//! every client connection open through the SIGKILL, its standby spare
//! joins the backup gone live without an operator, and its chart marks the
//! kill, the detection, the claim, the go-live and the re-protection
//! ("protected", from the survivor's event), in that order: on the time
//! axis and in the SVG.

mod common;

use std::time::Duration;

use common::*;

/// The text of every `<text>` element of an SVG written by plotters, with
/// its x coordinate, in document order.
fn svg_texts(svg: &str) -> Vec<(f64, String)> {
    svg.split("<text ")
        .skip(1)
        .filter_map(|el| {
            let x = el.split("x=\"").nth(1)?.split('"').next()?.parse().ok()?;
            let body = el.split_once('>')?.1.split("</text>").next()?.trim();
            Some((x, body.to_string()))
        })
        .collect()
}

#[test]
fn the_demo_keeps_connections_and_charts_its_failover() {
    if !kvm_available("the_demo_keeps_connections_and_charts_its_failover") {
        return;
    }
    if !vmm::netns::is_root() {
        panic!("the network demo needs root (network namespaces)");
    }
    let out = tempdir("demo-chart");
    let o = run_bounded(
        duet()
            .args(["demo", "--ops", "1200", "--kill-after", "500"])
            .arg("--tas-server")
            .arg(tas_server_bin())
            .arg("--out")
            .arg(out.path()),
        None,
        Duration::from_secs(120),
    );
    let text = stdout(&o);
    assert!(o.status.success(), "{text}\n{}", stderr(&o));
    assert!(
        text.contains(
            "connections           4 of 4 kept open across the failover; 0 had to reconnect"
        ),
        "{text}"
    );
    assert!(text.contains("backup went live      1 time(s)"), "{text}");
    // The re-protection's figures, from the survivor's `protected` event.
    assert!(
        text.contains("re-protection         the spare on host A joined the new primary"),
        "{text}"
    );
    for figure in [
        "  guest paused        ",
        "  time to protected   ",
        "  bytes sent          ",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(figure))
            .unwrap_or_else(|| panic!("no {figure:?} line:\n{text}"));
        let value: u64 = line[figure.len()..]
            .split(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no figure in {line:?}"));
        assert!(value > 0, "{line}");
    }
    assert!(text.contains("the VM is protected again"), "{text}");
    eprintln!(
        "{}",
        text.lines()
            .filter(|l| l.starts_with("re-protection") || l.starts_with("  ") && !l.contains(" s  "))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let svg = std::fs::read_to_string(out.path().join("duet-demo-failover.svg")).unwrap();
    let png = std::fs::read(out.path().join("duet-demo-failover.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let texts = svg_texts(&svg);
    let find = |prefix: &str| {
        texts
            .iter()
            .position(|(_, t)| t.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} mark in the chart: {texts:?}"))
    };
    let order = [
        find("kill"),
        find("detected +"),
        find("claim +"),
        find("go-live +"),
        find("protected +"),
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{texts:?}");
    let xs: Vec<f64> = order.iter().map(|&i| texts[i].0).collect();
    assert!(
        xs.windows(2).all(|w| w[0] <= w[1]),
        "marks out of time order: {texts:?}"
    );
}
