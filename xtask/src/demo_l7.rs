//! The L7 part of `cargo xtask demo` (issue 12): the client pod's agent
//! sends a waypoint-enrolled service's HTTP traffic through the real
//! `mesh-waypoint` binary, which applies an HTTPRoute 90/10 canary over
//! v1/v2 and a VirtualService retry policy that absorbs an upstream's 503s;
//! the split, the failures and the waypoint's `istio_requests_total` are
//! read from what the client and the waypoint observed. [`WaypointLab`] is
//! also the waypoint bench's lab (`bench_waypoint`).
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use mesh_lab::{Lab, LabChild, LabSpec, NodeSpec, PodSpec, app::HttpLoadReport};

use crate::labkit::{self, Bins};

/// The canary service (through the waypoint): HTTPRoute 90/10 over v1/v2.
pub const WEB_VIP: &str = "198.18.210.1:80";
/// The flaky service (through the waypoint): every 10th answer is a 503.
pub const PAY_VIP: &str = "198.18.210.2:80";
/// web-v1 without a waypoint (`istio.io/use-waypoint: none`): the node
/// proxies' L4 path only.
pub const DIRECT_VIP: &str = "198.18.210.3:80";
const ADMIN: &str = "127.0.0.1:15020";
const PAY_FAIL_EVERY: u64 = 10;

/// A lab with a client pod `shop` (node 0), backends `web-v1`, `web-v2`,
/// `pay` and the waypoint pod `wp` (node 1, not enrolled), both agents and
/// the real waypoint binary. Dropping it stops the processes; [`Self::close`]
/// also removes the namespaces.
pub struct WaypointLab {
    /// The lab.
    pub lab: Lab,
    /// The waypoint process.
    pub waypoint: LabChild,
    app: PathBuf,
    http: PathBuf,
    config: PathBuf,
    _children: Vec<LabChild>,
}

impl WaypointLab {
    /// Starts everything with the binaries of `bins`' directory; the
    /// waypoint logs at `log_level` (`info`: one access line per request)
    /// and `pay` has `pay_retries` retries on 5xx.
    pub fn start(bins: &Bins, log_level: &str, pay_retries: u32) -> anyhow::Result<Self> {
        let dir = bins
            .app
            .parent()
            .context("the binaries' directory")?
            .to_owned();
        let (waypoint_bin, http) = (dir.join("mesh-waypoint"), dir.join("mesh-lab-http"));
        for b in [&waypoint_bin, &http] {
            if !b.is_file() {
                bail!("{} is missing: build the workspace first", b.display());
            }
        }
        let lab = Lab::new(
            LabSpec::new()
                .node(NodeSpec::new().pod(PodSpec::new("shop")))
                .node(
                    NodeSpec::new()
                        .pod(PodSpec::new("web-v1"))
                        .pod(PodSpec::new("web-v2"))
                        .pod(PodSpec::new("pay"))
                        .pod(PodSpec::new("wp")),
                ),
        )?;
        let backends = [
            ("web-v1", true),
            ("web-v2", true),
            ("pay", true),
            ("wp", false),
        ];
        let mut n0 = lab.workload_file_yaml_with_remote(0, &[("shop", true)], &backends);
        n0.push_str(
            "services:\n\
             \x20 - {name: web, vips: [\"198.18.210.1\"], ports: [{name: http, port: 80, targetPort: 8081}], endpoints: [web-v1, web-v2], labels: {istio.io/use-waypoint: wp}}\n\
             \x20 - {name: pay, vips: [\"198.18.210.2\"], ports: [{name: http, port: 80, targetPort: 8081}], endpoints: [pay], labels: {istio.io/use-waypoint: wp}}\n\
             \x20 - {name: web-direct, vips: [\"198.18.210.3\"], ports: [{name: http, port: 80, targetPort: 8081}], endpoints: [web-v1]}\n\
             \x20 - {name: wp, vips: [\"198.18.210.9\"], ports: [{name: mesh, port: 15008}], endpoints: [wp]}\n"
        );
        labkit::write_workload_text(&lab, 0, &n0)?;
        labkit::write_workloads(&lab, 1, &backends, &[("shop", true)])?;
        let mut children = Vec::new();
        for (pod, name, fail) in [
            ("web-v1", "v1", 0),
            ("web-v2", "v2", 0),
            ("pay", "pay", PAY_FAIL_EVERY),
        ] {
            let mut cmd = Command::new(&http);
            cmd.args(["serve", "--listen", "[::]:8081", "--name", name])
                .args(["--fail-every", &fail.to_string()]);
            let child = lab.spawn_in_pod(pod, cmd)?;
            child.wait_for_log("listening", Duration::from_secs(10))?;
            children.push(child);
        }
        let config = lab.scratch_path("waypoint.yaml");
        let ip = |pod: &str| -> anyhow::Result<String> { Ok(lab.pod(pod)?.ipv4().to_string()) };
        let (v1, v2, pay, wp) = (ip("web-v1")?, ip("web-v2")?, ip("pay")?, ip("wp")?);
        let this_config = WaypointConfigText { v1, v2, pay };
        write_atomically(&config, &this_config.render(pay_retries))?;
        let ca = labkit::ca_dir(&lab, bins)?;
        let mut cmd = Command::new(&waypoint_bin);
        cmd.args(["run", "--listen", &format!("{wp}:15008"), "--admin", ADMIN])
            .args(["--identity", "spiffe://cluster.local/ns/default/sa/wp"])
            .arg("--ca-dir")
            .arg(&ca)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", log_level);
        let waypoint = lab.spawn_in_pod("wp", cmd)?;
        children.push(labkit::start_agent(&lab, bins, 0)?);
        children.push(labkit::start_agent(&lab, bins, 1)?);
        let this = Self {
            lab,
            waypoint,
            app: bins.app.clone(),
            http,
            config,
            _children: children,
        };
        // Ready when a request crosses both agents and the waypoint.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let r = this.load(WEB_VIP, 1, 1)?;
            if r.status(200) == 1 {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "no 200 through the waypoint in 20 s: {r:?}\nwaypoint log:\n{}",
                    this.waypoint.log_contents().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(this)
    }

    /// `requests` GETs from `shop` to `vip` over `concurrency` keep-alive
    /// connections.
    pub fn load(
        &self,
        vip: &str,
        requests: u64,
        concurrency: u64,
    ) -> anyhow::Result<HttpLoadReport> {
        let mut cmd = Command::new(&self.http);
        cmd.args(["load", "--connect", vip])
            .args(["--requests", &requests.to_string()])
            .args(["--concurrency", &concurrency.to_string()]);
        HttpLoadReport::from_output(&self.lab.run_in_pod_timeout(
            "shop",
            cmd,
            Duration::from_secs(120),
        )?)
    }

    /// The body of the waypoint's admin endpoint `path`.
    pub fn admin(&self, path: &str) -> anyhow::Result<String> {
        let mut cmd = Command::new(&self.app);
        cmd.args(["get", "--connect", ADMIN, "--path", path]);
        let out = self.lab.run_in_pod("wp", cmd)?;
        if !out.status.success() {
            bail!(
                "waypoint admin {path}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The waypoint's configuration generation (`/config_dump`).
    fn generation(&self) -> anyhow::Result<u64> {
        let dump: serde_json::Value = serde_json::from_str(&self.admin("/config_dump")?)?;
        dump["generation"]
            .as_u64()
            .context("no generation in /config_dump")
    }

    /// Rewrites the waypoint's configuration with `pay_retries` and waits
    /// until the waypoint has applied it (its generation moved; 10 s at most).
    pub fn set_pay_retries(&self, pay_retries: u32) -> anyhow::Result<()> {
        let before = self.generation()?;
        let text = std::fs::read_to_string(&self.config)?;
        let cfg = WaypointConfigText::parse(&text).context("the demo's own waypoint config")?;
        write_atomically(&self.config, &cfg.render(pay_retries))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.generation()? == before {
            if std::time::Instant::now() > deadline {
                bail!("the waypoint did not reload its configuration in 10 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// The waypoint's resident memory, in KiB.
    pub fn waypoint_rss_kib(&self) -> Option<u64> {
        labkit::rss_kib(self.waypoint.pid())
    }

    /// Stops the processes and removes the lab.
    pub fn close(self) -> anyhow::Result<()> {
        let Self {
            lab,
            waypoint,
            _children,
            ..
        } = self;
        drop(waypoint);
        drop(_children);
        lab.close()?;
        Ok(())
    }
}

fn write_atomically(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The waypoint's configuration: the pods' addresses, and the retries of `pay`.
struct WaypointConfigText {
    v1: String,
    v2: String,
    pay: String,
}

impl WaypointConfigText {
    fn render(&self, pay_retries: u32) -> String {
        let Self { v1, v2, pay } = self;
        let ep = |ip: &str, w: &str, version: &str| {
            format!(
                "{{ address: {ip}, tunnel: hbone, workload: {w}, serviceAccount: {w}, labels: {{ app: {w}, version: {version} }} }}"
            )
        };
        let (e1, e2, ep_pay) = (
            ep(v1, "web-v1", "v1"),
            ep(v2, "web-v2", "v2"),
            ep(pay, "pay", "v1"),
        );
        format!(
            "# pods: {v1} {v2} {pay}\n\
services:
  - {{ name: web, namespace: default, addresses: [198.18.210.1], ports: [{{ port: 80, targetPort: 8081, protocol: http }}], endpoints: [{e1}, {e2}] }}
  - {{ name: web-v1, namespace: default, ports: [{{ port: 80, targetPort: 8081, protocol: http }}], endpoints: [{e1}] }}
  - {{ name: web-v2, namespace: default, ports: [{{ port: 80, targetPort: 8081, protocol: http }}], endpoints: [{e2}] }}
  - {{ name: pay, namespace: default, addresses: [198.18.210.2], ports: [{{ port: 80, targetPort: 8081, protocol: http }}], endpoints: [{ep_pay}] }}
routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {{ name: web, namespace: default }}
    spec:
      parentRefs: [{{ group: \"\", kind: Service, name: web, port: 80 }}]
      rules:
        - backendRefs: [{{ name: web-v1, port: 80, weight: 90 }}, {{ name: web-v2, port: 80, weight: 10 }}]
  - apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{ name: pay, namespace: default }}
    spec:
      hosts: [pay]
      http:
        - retries: {{ attempts: {pay_retries}, retryOn: 5xx }}
          route: [{{ destination: {{ host: pay }} }}]
"
        )
    }

    /// The addresses back from a rendered text's first line.
    fn parse(text: &str) -> Option<Self> {
        let mut it = text.lines().next()?.strip_prefix("# pods: ")?.split(' ');
        Some(Self {
            v1: it.next()?.to_owned(),
            v2: it.next()?.to_owned(),
            pay: it.next()?.to_owned(),
        })
    }
}

const CANARY_REQUESTS: u64 = 1000;
const PAY_REQUESTS: u64 = 500;

/// Runs the L7 demo with `bins`.
pub fn run(bins: &Bins) -> anyhow::Result<()> {
    println!("\n== waypoint: HTTP routing by the real mesh-waypoint (L7), between two agents\n");
    let started = std::time::Instant::now();
    let w = WaypointLab::start(bins, "info", 0)?;
    println!("  client pod shop (node 0) -> its agent -> HBONE -> waypoint pod wp (node 1)");
    println!("  -> HBONE under the waypoint's identity -> node 1's agent -> web-v1 / web-v2 / pay");
    println!("  services web and pay carry istio.io/use-waypoint: wp; web-direct does not\n");

    let r = w.load(WEB_VIP, CANARY_REQUESTS, 8)?;
    let n = |name: &str| r.backends.get(name).copied().unwrap_or(0);
    println!("  HTTPRoute web: backendRefs web-v1 weight 90, web-v2 weight 10");
    println!(
        "    {CANARY_REQUESTS} requests (8 keep-alive connections): v1 answered {} ({:.1} %), v2 answered {} ({:.1} %), non-200: {}",
        n("v1"),
        100.0 * n("v1") as f64 / CANARY_REQUESTS as f64,
        n("v2"),
        100.0 * n("v2") as f64 / CANARY_REQUESTS as f64,
        CANARY_REQUESTS - r.status(200)
    );
    println!();
    println!(
        "  service pay: its pod answers 503 to every {PAY_FAIL_EVERY}th request; VirtualService pay, retryOn 5xx"
    );
    let without = w.load(PAY_VIP, PAY_REQUESTS, 4)?;
    w.set_pay_retries(2)?;
    let with = w.load(PAY_VIP, PAY_REQUESTS, 4)?;
    for (what, r) in [
        ("retries: {attempts: 0}", &without),
        ("retries: {attempts: 2}", &with),
    ] {
        println!(
            "    {what:<24} {PAY_REQUESTS} requests: {} x 200, {} x 503 seen by the client",
            r.status(200),
            r.status(503)
        );
    }
    let metrics = w.admin("/metrics")?;
    let retries: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("mesh_waypoint_retries_total"))
        .collect();
    println!("    the waypoint's retry counters: {}", retries.join("  "));

    println!(
        "\n  the waypoint's istio_requests_total (reporter=\"waypoint\"; a few labels shown):"
    );
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
    {
        println!("    {}", short_labels(line));
    }
    w.close()?;
    println!(
        "\n== waypoint lab removed ({:.0} s)\n",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `istio_requests_total{...} N` with only the labels a reader compares.
fn short_labels(line: &str) -> String {
    const KEEP: [&str; 5] = [
        "source_workload",
        "destination_service_name",
        "destination_version",
        "response_code",
        "response_flags",
    ];
    let Some((labels, value)) = line
        .strip_prefix("istio_requests_total{")
        .and_then(|l| l.rsplit_once("} "))
    else {
        return line.to_owned();
    };
    let kept: Vec<&str> = labels
        .split(',')
        .filter(|kv| KEEP.iter().any(|k| kv.starts_with(&format!("{k}="))))
        .collect();
    format!("istio_requests_total{{{}}} {value}", kept.join(","))
}
