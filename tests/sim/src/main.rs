//! nk3-sim: a k3s cluster of NixOS nodes, simulated, each node running the real `nk3-agent`.
//!
//! Everything but the machines is real: the agent binary, a git repository, the k3s API
//! (the real control plane of `tests/controlplane` — kube-apiserver, kube-controller-manager,
//! kube-scheduler, etcd — when it is built; else the API test server of `tests/apiserver`,
//! and the simulator says which). The machines are simulated by the stand-ins in `tests/bin`
//! (nixos-rebuild, systemctl, kubectl) and by this program, which plays systemd and the
//! hardware: when an agent asks for a reboot it stops the agent and the machine's kubelet
//! (the real node-lifecycle controller then marks the Node NotReady), waits the reboot
//! time, boots the profile's generation with a new boot id, starts the kubelet again
//! (unless the generation is broken: its k3s never comes up) and starts the agent again.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use clap::Parser;
mod api;

use api::Api;

/// Simulate a rolling update on a k3s cluster managed by nk3.
#[derive(Debug, Parser)]
#[command(name = "nk3-sim", version, about)]
struct Args {
    /// How many nodes (the first three are the original tool's example inventory).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// How long a simulated reboot takes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    reboot_time: Duration,
    /// Push a generation whose k3s never starts: the first node rolls it back and halts it.
    #[arg(long)]
    broken: bool,
    /// How many nodes may be disrupted at once.
    #[arg(long, default_value_t = 1)]
    max_unavailable: u32,
    /// Give up after this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// The change pushed: `every` node gets a new DNS resolver; `initiator-flip` makes the
    /// second node bootstrap the cluster instead of the first (the original tool's example);
    /// `one` changes the first node only.
    /// `nix-error` pushes a configuration Nix refuses.
    #[arg(long, default_value = "every", value_parser = ["every", "initiator-flip", "one", "nix-error"])]
    change: String,
    /// Push a second commit as soon as the first node has applied the first.
    #[arg(long)]
    second_commit: bool,
    /// Kill -9 the first agent seen in this phase (draining, switching, rebooting,
    /// verifying); it is started again at once, as systemd's Restart=always would.
    #[arg(long, value_name = "PHASE")]
    kill_in: Option<String>,
    /// The first machine seen in this phase dies for good (its agent killed and never
    /// started again, its Node NotReady); once its lease has expired the simulator takes it
    /// out of the inventory, as an operator would, and the rollout goes on.
    #[arg(long, value_name = "PHASE")]
    die_in: Option<String>,
    /// Make the k3s API unreachable for this long right after the push.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    api_down: Option<Duration>,
    /// Stop the git server for this long once every agent has fetched the pushed commit and
    /// the first node is being disrupted (the agents then work from what they fetched).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    git_down: Option<Duration>,
    /// Print every agent log line, not only the rollout's milestones.
    #[arg(long)]
    verbose: bool,
    /// Right after the push, announce it with `nk3-agent nudge --commit HEAD`, as the
    /// repository's CI would: every agent fetches at once instead of at its next poll.
    #[arg(long)]
    nudge: bool,
    /// Instead of a rollout: leave the cluster idle this long, then report each idle
    /// agent's API requests and CPU per minute (the idle benchmark).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    idle: Option<Duration>,
    /// Build the real control plane first if it is not built (about 6 minutes, once).
    #[arg(long)]
    build_control_plane: bool,
    /// Refuse to run on the stand-in API server (tests and the soak use this).
    #[arg(long)]
    real_api: bool,
    /// Make the last N nodes agent-role nodes: k3s writes no kubeconfig there, so each gets
    /// the credentials `nk3-agent credentials` makes (needs the real control plane).
    #[arg(long, value_name = "N", default_value_t = 0)]
    agents: usize,
}

/// The workspace root (where tests/bin and the agent binary are).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from("."))
}

/// The nk3-agent binary built next to this one.
fn agent_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("nk3-agent");
    if !bin.exists() {
        bail!(
            "{} not found; build it first (cargo build -p nk3-agent with the same profile)",
            bin.display()
        );
    }
    Ok(bin)
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let o = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "operator")
        .env("GIT_AUTHOR_EMAIL", "ops@example.com")
        .env("GIT_COMMITTER_NAME", "operator")
        .env("GIT_COMMITTER_EMAIL", "ops@example.com")
        .output()
        .context("git is needed")?;
    if !o.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Writes the inventory in the work clone, commits everything and pushes; the new head.
fn push(work: &Path, inventory: &str, message: &str) -> anyhow::Result<String> {
    std::fs::write(work.join("inventory.yaml"), inventory)?;
    git(work, &["add", "-A"])?;
    git(work, &["commit", "-q", "-m", message])?;
    git(work, &["push", "-q", "origin", "main"])?;
    git(work, &["rev-parse", "HEAD"])
}

fn inventory(n: usize, agents: usize, max_unavailable: u32, extra: &str) -> String {
    inventory_with(n, agents, max_unavailable, extra, 0, "", None)
}

/// The inventory; the last `agents` nodes are agent-role, `initiator` is the index of the
/// bootstrapping node, `first_extra` extra lines for the first node.
fn inventory_with(
    n: usize,
    agents: usize,
    max_unavailable: u32,
    extra: &str,
    initiator: usize,
    first_extra: &str,
    gone: Option<usize>,
) -> String {
    let mut s = String::from(
        "cluster:\n  join_address: 172.30.190.3\n  join_token: 2f909ce8-cae1-439a-86b3-da87b7ee9f55\n  default_gateway: 172.30.190.1\n",
    );
    s.push_str(extra);
    s.push_str(&format!(
        "  rollout:\n    reboot: always\n    health_timeout: 8s\n    lease_duration: 10s\n    max_unavailable: {max_unavailable}\n  nodes:\n"
    ));
    for i in (0..n).filter(|i| Some(*i) != gone) {
        s.push_str(&format!(
            "    172.30.190.{}:\n      initiator: {}\n{}      interface: enp3s0f0\n      boot_device: /dev/nvme0n1\n{}",
            3 + i,
            i == initiator,
            if i >= n - agents { "      role: agent\n" } else { "" },
            if i == 0 { first_extra } else { "" }
        ));
    }
    s
}

/// One simulated machine.
struct Machine {
    ip: String,
    host: String,
    label: String,
    root: PathBuf,
    agent: Option<Child>,
    /// The credentials its agent uses: k3s.yaml on servers, nk3's own on agent nodes.
    kubeconfig: PathBuf,
    /// A stand-in kill point (NK3_FAKE_KILL) and the directory that lets only the first node
    /// reaching it be killed.
    kill: Option<(String, PathBuf)>,
}

impl Machine {
    fn new(base: &Path, i: usize) -> anyhow::Result<Machine> {
        let ip = format!("172.30.190.{}", 3 + i);
        let host = nk3_common::naming::hostname_for(&ip);
        let root = base.join(format!("node-{}", i + 1));
        for d in [
            "etc/nixos",
            "var/lib/nk3-agent",
            "run",
            "nix/store/0-installer",
        ] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let installer = root.join("nix/store/0-installer");
        std::fs::write(installer.join("kernel"), "installer kernel")?;
        std::fs::write(installer.join("kernel-params"), "")?;
        std::os::unix::fs::symlink(&installer, root.join("run/current-system"))?;
        std::os::unix::fs::symlink(&installer, root.join("run/booted-system"))?;
        std::fs::write(root.join("boot_id"), new_boot_id())?;
        std::fs::write(
            root.join("etc/nixos/configuration.nix"),
            "{ ... }: {\n  imports = [ ./hardware-configuration.nix ./nk3.nix ];\n  system.stateVersion = \"24.05\"; # Did you read the comment?\n}\n",
        )?;
        Ok(Machine {
            label: format!("node-{}", i + 1),
            ip,
            host,
            kubeconfig: root.join("etc/rancher/k3s/k3s.yaml"),
            root,
            agent: None,
            kill: None,
        })
    }

    fn command(&self, repo: &str, args: &[&str]) -> Command {
        let bin = workspace().join("tests/bin");
        let r = &self.root;
        let mut c = Command::new(agent_binary().expect("agent binary"));
        c.args(args)
            .current_dir(r)
            .env("NK3_REPO", repo)
            .env("NK3_NODE", &self.ip)
            .env("NK3_STATE_DIR", r.join("var/lib/nk3-agent"))
            .env("NK3_NIXOS_DIR", r.join("etc/nixos"))
            .env("NK3_NIXOS_REBUILD", bin.join("nixos-rebuild"))
            .env("NK3_SYSTEMCTL", bin.join("systemctl"))
            .env("NK3_NIX_CHANNEL", bin.join("nix-channel"))
            .env("NK3_KUBECTL", bin.join("kubectl"))
            .env("NK3_CURRENT_SYSTEM", r.join("run/current-system"))
            .env("NK3_BOOTED_SYSTEM", r.join("run/booted-system"))
            .env("NK3_BOOT_ID_FILE", r.join("boot_id"))
            .env("NK3_PRODUCT_UUID_FILE", r.join("product_uuid"))
            .env("NK3_KUBECONFIG", &self.kubeconfig)
            .env("NK3_K3S_DATA_DIR", r.join("var/lib/rancher/k3s"))
            .env("NK3_FAKE_ROOT", r)
            .env("NK3_SIM_SUPERVISED", "1")
            .env("NK3_POLL_INTERVAL", "2s")
            .env_remove("JOURNAL_STREAM");
        if let Some((point, once)) = &self.kill {
            c.env("NK3_FAKE_KILL", point)
                .env("NK3_FAKE_KILL_ONCE", once);
        }
        c
    }

    fn state(&self) -> serde_json::Value {
        std::fs::read_to_string(self.root.join("var/lib/nk3-agent/state.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// The system the machine boots into: the profile's newest generation.
    fn boot(&self) -> anyhow::Result<bool> {
        let profile = self.root.join("nix/var/nix/profiles/system");
        let system = std::fs::canonicalize(&profile).context("no system profile to boot")?;
        for link in ["run/booted-system", "run/current-system"] {
            let l = self.root.join(link);
            let _ = std::fs::remove_file(&l);
            std::os::unix::fs::symlink(&system, &l)?;
        }
        std::fs::write(self.root.join("boot_id"), new_boot_id())?;
        Ok(!system.join("k3s-broken").exists())
    }
}

/// `nk3-agent credentials` for an agent-role machine, as an operator runs it on a server,
/// installed where the machine's agent reads it.
fn agent_credentials(api: &Api, m: &Machine, base: &Path) -> anyhow::Result<()> {
    let (admin, url) = match api {
        Api::Real(c) => (c.admin_kubeconfig(), c.url()),
        Api::StandIn(_) => bail!("--agents needs the real control plane (RBAC, service accounts)"),
    };
    let file = base.join("admin.kubeconfig");
    std::fs::write(&file, admin)?;
    let o = Command::new(agent_binary()?)
        .arg("credentials")
        .arg(&m.host)
        .args(["--server", &url, "--kubeconfig"])
        .arg(&file)
        .arg("--out")
        .arg(&m.kubeconfig)
        .output()?;
    if !o.status.success() {
        bail!(
            "nk3-agent credentials {}: {}",
            m.host,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

fn new_boot_id() -> String {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{:032x}", n ^ u128::from(std::process::id()))
}

/// Lines the demo shows without --verbose.
fn milestone(line: &str) -> bool {
    [
        "modified:",
        "Rebuilding NixOS",
        "waiting for the rollout lease",
        "Draining",
        "Rebooting",
        "is back",
        "k8s is ready",
        "rolling back",
        "halted",
        "FROZEN",
        "not disrupting",
        "No action needed",
    ]
    .iter()
    .any(|m| line.contains(m))
}

/// Starts a machine's agent daemon, its log printed with the machine's label.
fn start_agent(m: &mut Machine, repo: &str, verbose: bool, started: Instant) -> anyhow::Result<()> {
    let mut child = m
        .command(repo, &["run"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let err = child.stderr.take().expect("piped");
    let label = m.label.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            // Drop the agent's own timestamp and fields; show time since the start.
            let msg = line
                .split_once("  INFO ")
                .or_else(|| line.split_once("  WARN "))
                .or_else(|| line.split_once(" ERROR "))
                .map(|(_, m)| m)
                .unwrap_or(&line);
            let msg = msg.split(" host=").next().unwrap_or(msg).trim();
            if verbose || milestone(msg) {
                println!(
                    "{:>6.1}s  {label:<7} {msg}",
                    started.elapsed().as_secs_f64()
                );
            }
        }
    });
    m.agent = Some(child);
    Ok(())
}

fn main() -> std::process::ExitCode {
    match simulate() {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("nk3-sim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the simulation; `Ok(false)` when it did not converge or broke an invariant.
fn simulate() -> anyhow::Result<bool> {
    let args = Args::parse();
    if args.nodes == 0 || args.nodes > 200 {
        bail!("--nodes must be between 1 and 200");
    }
    let dir = tempfile::tempdir()?;
    let base = dir.path();
    let api = Api::start(args.build_control_plane, args.real_api)?;
    println!(
        "nk3-sim: {} simulated NixOS nodes running the real nk3-agent, a git repository, and {}",
        args.nodes,
        api.describe()
    );

    // The repository, with the original tool's inventory (grown to --nodes).
    git(base, &["init", "-q", "--bare", "-b", "main", "infra.git"])?;
    git(base, &["clone", "-q", "infra.git", "work"])?;
    let work = base.join("work");
    git(&work, &["checkout", "-q", "-b", "main"])?;
    push(
        &work,
        &inventory(args.nodes, args.agents, args.max_unavailable, ""),
        "the cluster",
    )?;
    // The repository is served by git daemon on loopback, as a real git server would be.
    let port = nk3_controlplane::unused_port();
    let exec_path = git(base, &["--exec-path"])?;
    let serve = |port: u16| -> anyhow::Result<Child> {
        let child = Command::new(Path::new(&exec_path).join("git-daemon"))
            .args(["--reuseaddr", "--export-all", "--listen=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("git daemon")?;
        let up = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if up.elapsed() > Duration::from_secs(10) {
                bail!("git daemon did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    };
    let mut daemon = Some(serve(port)?);
    let repo = format!("git://127.0.0.1:{port}/infra.git");

    // Bring the machines up: each applies the inventory before its k3s runs (bootstrap),
    // then k3s "starts": the Node appears Ready and the kubeconfig is written.
    let started = Instant::now();
    let mut machines = Vec::new();
    if args.agents >= args.nodes {
        bail!("--agents must leave at least one server");
    }
    for i in 0..args.nodes {
        let mut m = Machine::new(base, i)?;
        for _ in 0..2 {
            let o = m
                .command(&repo, &["run", "--once"])
                .env_remove("NK3_SIM_SUPERVISED")
                .output()?;
            if !o.status.success() && m.state()["phase"]["name"] != "rebooting" {
                bail!(
                    "{} did not come up: {}",
                    m.label,
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
        // k3s joined: the kubelet's certificate a server signed lands in its data
        // directory; a server also writes the admin kubeconfig, an agent node gets nk3's.
        let data = m.root.join("var/lib/rancher/k3s/agent");
        std::fs::create_dir_all(&data)?;
        std::fs::write(data.join("client-kubelet.crt"), "certificate\n")?;
        if i >= args.nodes - args.agents {
            m.kubeconfig = m.root.join("var/lib/nk3-agent/kubeconfig");
            agent_credentials(&api, &m, base)?;
        } else {
            let k = &m.kubeconfig;
            std::fs::create_dir_all(k.parent().expect("parent"))?;
            std::fs::write(k, api.kubeconfig(&m.host))?;
        }
        api.add_node(&m.host, &m.root.join("boot_id"));
        machines.push(m);
    }
    println!(
        "{:>6.1}s  all {} nodes run the first commit and are Ready",
        started.elapsed().as_secs_f64(),
        args.nodes
    );
    // Kills happen at the exact moment, inside the stand-in the agent is running; draining
    // runs no command, so it is caught from outside, made long enough by a pod to evict.
    let kill_point = match args.kill_in.as_deref() {
        Some("switching") => Some("boot-start"),
        Some("rebooting") => Some("reboot-start"),
        Some("verifying") => Some("is-active-start"),
        _ => None,
    };
    for m in &mut machines {
        if let Some(point) = kill_point {
            m.kill = Some((point.to_string(), base.join("killed-once")));
        }
        if args.kill_in.as_deref() == Some("draining") {
            api.add_pod(
                "default",
                &format!("web-{}", m.label),
                &m.host,
                serde_json::json!({"app": "web"}),
                2,
            );
        }
        start_agent(m, &repo, args.verbose, started)?;
    }

    // The change: a new DNS resolver for every node (and, with --broken, a template whose
    // k3s never starts).
    let (mut extra, initiator, first_extra, what) = match args.change.as_str() {
        "initiator-flip" => (
            String::new(),
            1.min(args.nodes - 1),
            "",
            "node-2 bootstraps the cluster instead of node-1",
        ),
        "one" => (
            String::new(),
            0,
            "      k3s_extra_flags: [ --node-label=disk=ssd ]\n",
            "a new label for node-1 only",
        ),
        "nix-error" => {
            std::fs::write(
                work.join("bad.nix.hbs"),
                "{ config, ... }: {\n  networking.hostName = ;\n}\n",
            )?;
            (
                "  template: bad.nix.hbs\n".to_string(),
                0,
                "",
                "a template with a Nix syntax error",
            )
        }
        _ => (
            "  nameservers: [ 9.9.9.9 ]\n".to_string(),
            0,
            "",
            "a new resolver for every node",
        ),
    };
    if args.broken {
        let t = std::fs::read_to_string(workspace().join("common/src/render/default.nix.hbs"))?;
        std::fs::write(
            work.join("broken.nix.hbs"),
            format!("# nk3-test: k3s-broken\n{t}"),
        )?;
        extra.push_str("  template: broken.nix.hbs\n");
    }
    if let Some(idle) = args.idle {
        return idle_report(&api, &mut machines, idle);
    }
    let mut head = push(
        &work,
        &inventory_with(
            args.nodes,
            args.agents,
            args.max_unavailable,
            &extra,
            initiator,
            first_extra,
            None,
        ),
        what,
    )?;
    let rollout_start = Instant::now();
    if args.nudge {
        let o = machines[0]
            .command(&repo, &["nudge", "--commit", &head])
            .output()?;
        if !o.status.success() {
            bail!(
                "nk3-agent nudge failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    println!(
        "{:>6.1}s  git push {}: {}",
        started.elapsed().as_secs_f64(),
        &head[..12],
        if args.broken {
            format!("{what}, in a generation whose k3s never starts")
        } else {
            what.to_string()
        }
    );
    let mut second_pending = args.second_commit;
    let mut die_pending = args.die_in.clone();
    // The machine that died, and when.
    let mut dead: Option<(usize, Instant)> = None;
    let mut removed = false;

    // Play systemd and the hardware until every node settles.
    let reboots: Arc<Mutex<Vec<(usize, Instant)>>> = Arc::default();
    let mut downs: Vec<(usize, SystemTime)> = Vec::new();
    let deadline = Instant::now() + args.timeout;
    let mut converged = true;
    let mut kill_pending = args.kill_in.clone();
    let api_back = args.api_down.map(|d| {
        api.set_down(true);
        println!(
            "{:>6.1}s  the k3s API is down for {}",
            started.elapsed().as_secs_f64(),
            humantime::format_duration(d)
        );
        Instant::now() + d
    });
    let mut api_is_down = api_back.is_some();
    let mut git_back: Option<Instant> = None;
    let mut git_pending = args.git_down;
    loop {
        if let Some(d) = git_pending {
            let disrupting = |m: &Machine| {
                matches!(
                    m.state()["phase"]["name"].as_str(),
                    Some("draining" | "switching" | "rebooting" | "verifying")
                )
            };
            // Once every agent has fetched the commit (what is mid-rollout about it) and one
            // node is being disrupted.
            let fetched = machines
                .iter()
                .all(|m| m.state()["fetched"] == head.as_str());
            if fetched && machines.iter().any(disrupting) {
                if let Some(mut c) = daemon.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                git_back = Some(Instant::now() + d);
                git_pending = None;
                println!(
                    "{:>6.1}s  the git server is down for {}",
                    started.elapsed().as_secs_f64(),
                    humantime::format_duration(d)
                );
            }
        }
        if git_back.is_some_and(|t| Instant::now() >= t) {
            daemon = Some(serve(port)?);
            git_back = None;
            println!(
                "{:>6.1}s  the git server is back",
                started.elapsed().as_secs_f64()
            );
        }
        if api_is_down && api_back.is_some_and(|t| Instant::now() >= t) {
            api.set_down(false);
            api_is_down = false;
            println!(
                "{:>6.1}s  the k3s API is back",
                started.elapsed().as_secs_f64()
            );
        }
        if let Some(phase) = die_pending.clone() {
            if let Some((i, m)) = machines
                .iter_mut()
                .enumerate()
                .find(|(_, m)| m.agent.is_some() && m.state()["phase"]["name"] == phase.as_str())
            {
                if let Some(mut c) = m.agent.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                api.machine_up(&m.host, false);
                println!(
                    "{:>6.1}s  {:<7} died for good while {phase} (holding the lease)",
                    started.elapsed().as_secs_f64(),
                    m.label
                );
                dead = Some((i, Instant::now()));
                die_pending = None;
            }
        }
        if let (Some((i, when)), false) = (dead, removed) {
            // The lease runs out 10 s after the last renewal; the others wait, then the gate
            // holds them while the dead Node is NotReady. An operator takes it out.
            if when.elapsed() > Duration::from_secs(14) {
                // The operator deletes its Node object (kubectl delete node) and takes it out of
                // the inventory.
                api.delete_node(&machines[i].host);
                head = push(
                    &work,
                    &inventory_with(
                        args.nodes,
                        args.agents,
                        args.max_unavailable,
                        &extra,
                        initiator,
                        first_extra,
                        Some(i),
                    ),
                    "remove the dead node",
                )?;
                removed = true;
                println!(
                    "{:>6.1}s  git push {}: {} taken out of the inventory",
                    started.elapsed().as_secs_f64(),
                    &head[..12],
                    machines[i].label
                );
            }
        }
        if let (Some(phase), None) = (kill_pending.clone(), kill_point) {
            if let Some(m) = machines
                .iter_mut()
                .find(|m| m.agent.is_some() && m.state()["phase"]["name"] == phase.as_str())
            {
                if let Some(mut c) = m.agent.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                println!(
                    "{:>6.1}s  {:<7} agent killed (SIGKILL) while {phase}; systemd starts it again",
                    started.elapsed().as_secs_f64(),
                    m.label
                );
                start_agent(m, &repo, args.verbose, started)?;
                kill_pending = None;
            }
        }
        for (i, m) in machines.iter_mut().enumerate() {
            if dead.is_some_and(|(d, _)| d == i) {
                continue;
            }
            let exited = match m.agent.as_mut() {
                Some(c) => c.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                m.agent = None;
                use std::os::unix::process::ExitStatusExt as _;
                if status.signal() == Some(9) {
                    if let Some(phase) = kill_pending.take() {
                        println!(
                            "{:>6.1}s  {:<7} agent killed (SIGKILL) while {phase}; systemd starts it again",
                            started.elapsed().as_secs_f64(),
                            m.label
                        );
                    }
                }
                let asked = m.root.join("reboot-requested");
                if asked.exists() {
                    // The moment the agent asked systemd to reboot the machine.
                    let at = std::fs::metadata(&asked)?.modified()?;
                    downs.push((i, at));
                    api.machine_up(&m.host, false);
                    reboots
                        .lock()
                        .expect("lock")
                        .push((i, Instant::now() + args.reboot_time));
                    println!(
                        "{:>6.1}s  {:<7} is down (simulated reboot, {})",
                        started.elapsed().as_secs_f64(),
                        m.label,
                        humantime::format_duration(args.reboot_time)
                    );
                } else {
                    start_agent(m, &repo, args.verbose, started)?;
                }
            }
        }
        let due: Vec<usize> = {
            let mut r = reboots.lock().expect("lock");
            let now = Instant::now();
            let due = r
                .iter()
                .filter(|(_, t)| *t <= now)
                .map(|(i, _)| *i)
                .collect();
            r.retain(|(_, t)| *t > now);
            due
        };
        for i in due {
            let m = &mut machines[i];
            let _ = std::fs::remove_file(m.root.join("reboot-requested"));
            let healthy = m.boot()?;
            api.machine_up(&m.host, healthy);
            println!(
                "{:>6.1}s  {:<7} booted{}",
                started.elapsed().as_secs_f64(),
                m.label,
                if healthy {
                    "; k3s is up"
                } else {
                    "; k3s does not start"
                }
            );
            start_agent(m, &repo, args.verbose, started)?;
        }
        if second_pending
            && machines
                .iter()
                .any(|m| m.state()["applied"] == head.as_str())
        {
            second_pending = false;
            let more = format!("{extra}  ssh_authorized_keys: [ \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGvU9D2rsCWEmm3mZmrqKBX0tkpPMngu8nF6vyy6o8xz second\" ]\n");
            head = push(
                &work,
                &inventory_with(
                    args.nodes,
                    args.agents,
                    args.max_unavailable,
                    &more,
                    initiator,
                    first_extra,
                    dead.map(|(i, _)| i),
                ),
                "a second change, mid-rollout",
            )?;
            println!(
                "{:>6.1}s  git push {}: a second change, mid-rollout",
                started.elapsed().as_secs_f64(),
                &head[..12]
            );
        }
        let settled = machines
            .iter()
            .enumerate()
            .filter(|(i, _)| dead.is_none_or(|(d, _)| d != *i))
            .all(|(_, m)| {
                let st = m.state();
                let idle = st["phase"]["name"] == "idle";
                let applied = st["applied"] == head.as_str();
                let halted = st["rejected"]["commit"] == head.as_str();
                idle && (applied || halted)
            });
        if settled && reboots.lock().expect("lock").is_empty() {
            break;
        }
        if Instant::now() > deadline {
            eprintln!(
                "nk3-sim: not settled after {}",
                humantime::format_duration(args.timeout)
            );
            converged = false;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let wall = rollout_start.elapsed();
    if let Some(mut c) = daemon.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    for m in &mut machines {
        if let Some(mut c) = m.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    // The table.
    let writes = api.writes();
    println!();
    println!(
        "{:<8} {:<38} {:<13} {:<9} {:>10}  outcome",
        "node", "hostname", "commit", "phase", "lease held"
    );
    for m in &machines {
        let st = m.state();
        let held = lease_time(&writes, &m.host);
        let outcome = if dead.is_some_and(|(d, _)| machines[d].host == m.host) {
            "died; taken out of the inventory".to_string()
        } else if st["applied"] == head.as_str() {
            "applied".to_string()
        } else if st["rejected"]["commit"] == head.as_str() {
            st["rejected"]["error"]
                .as_str()
                .unwrap_or("rejected")
                .chars()
                .take(60)
                .collect()
        } else {
            "did not converge".to_string()
        };
        println!(
            "{:<8} {:<38} {:<13} {:<9} {:>9.1}s  {}",
            m.label,
            m.host,
            st["applied"].as_str().map(|c| &c[..12]).unwrap_or("-"),
            st["phase"]["name"].as_str().unwrap_or("-"),
            held.as_secs_f64(),
            outcome
        );
    }
    let most = max_cordoned(&writes);
    // No machine reboots unless it holds a rollout lease at that moment.
    let outside: Vec<String> = downs
        .iter()
        .filter(|(i, at)| !holders_at(&writes, *at).contains(&machines[*i].host))
        .map(|(i, _)| machines[*i].label.clone())
        .collect();
    println!();
    println!(
        "{} reboot(s), {} of them without the rebooting node holding a rollout lease{}",
        downs.len(),
        outside.len(),
        if outside.is_empty() {
            String::new()
        } else {
            format!(": {}", outside.join(", "))
        }
    );
    let mut agents_ok = true;
    if args.agents > 0 {
        let mut done = 0;
        for m in &machines[args.nodes - args.agents..] {
            let sa = format!("system:serviceaccount:kube-system:nk3-agent-{}", m.host);
            let by = |f: &dyn Fn(&api::Write) -> bool| writes.iter().any(|w| w.user == sa && f(w));
            let drained =
                by(&|w| w.resource == "nodes" && w.object["spec"]["unschedulable"] == true);
            let verified = by(&|w| w.resource == "events" && w.object["reason"] == "Ready");
            if drained && verified {
                done += 1;
            }
        }
        let refused = api.refused_for("system:serviceaccount:kube-system:nk3-agent-");
        println!(
            "agent-role nodes: {done} of {} drained and verified with their own credentials; {refused} request(s) of theirs refused (403)",
            args.agents
        );
        agents_ok = refused == 0 && (done == args.agents || args.broken || args.change != "every");
    }
    let held: Duration = machines.iter().map(|m| lease_time(&writes, &m.host)).sum();
    println!();
    println!(
        "rollout took {:.1}s; at most {most} node(s) cordoned at once (max_unavailable {})",
        wall.as_secs_f64(),
        args.max_unavailable
    );
    if held > Duration::ZERO {
        println!(
            "time holding the lease, all nodes: {:.1}s; rollout time / that = {:.2}",
            held.as_secs_f64(),
            wall.as_secs_f64() / held.as_secs_f64()
        );
    }
    if let Some(phase) = kill_pending {
        // Not a failure of the rollout: no agent stayed in that phase long enough to be
        // caught (a change that disrupts few nodes, say).
        println!("note: no agent was seen in phase {phase}, so none was killed");
    }
    Ok(converged && most <= args.max_unavailable as usize && outside.is_empty() && agents_ok)
}

/// Who held each rollout lease at `at`, from the API's write log.
fn holders_at(writes: &[api::Write], at: SystemTime) -> Vec<String> {
    let mut held = std::collections::BTreeMap::new();
    for w in writes
        .iter()
        .filter(|w| w.resource == "leases" && w.namespace == "kube-system" && w.at <= at)
    {
        let holder = w.object["spec"]["holderIdentity"].as_str().unwrap_or("");
        held.insert(w.name.clone(), holder.to_string());
    }
    held.into_values().filter(|h| !h.is_empty()).collect()
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// The idle benchmark: every agent runs, nothing changes, the kubelets heartbeat; what
/// does an idle agent cost the API and the machine?
fn idle_report(api: &Api, machines: &mut [Machine], idle: Duration) -> anyhow::Result<bool> {
    // Let the first passes end and the agents settle into their wait.
    std::thread::sleep(Duration::from_secs(10));
    let pids: Vec<u32> = machines
        .iter()
        .filter_map(|m| m.agent.as_ref().map(Child::id))
        .collect();
    let cpu0: Vec<Duration> = pids.iter().map(|p| cpu_time(*p)).collect();
    let from = api.requests_by_agents();
    println!(
        "idle for {} with {} agents (poll interval 2s)…",
        humantime::format_duration(idle),
        pids.len()
    );
    std::thread::sleep(idle);
    let made = api.requests_by_agents().saturating_sub(from);
    let cpu: Duration = pids
        .iter()
        .zip(&cpu0)
        .map(|(p, c0)| cpu_time(*p).saturating_sub(*c0))
        .sum();
    let minutes = idle.as_secs_f64() / 60.0;
    let per_agent = pids.len().max(1) as f64;
    println!(
        "per idle agent: {:.1} API requests a minute, {:.3} s of CPU a minute ({:.3} % of a core)",
        made as f64 / minutes / per_agent,
        cpu.as_secs_f64() / minutes / per_agent,
        cpu.as_secs_f64() / idle.as_secs_f64() / per_agent * 100.0
    );
    // Resident memory of each idle agent, its API client and the Lease watch of its wait
    // included (target: 12 MiB).
    let kib = |pid: u32, key: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()?
            .lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let rss: Vec<u64> = pids.iter().filter_map(|p| kib(*p, "VmRSS:")).collect();
    let peak: Vec<u64> = pids.iter().filter_map(|p| kib(*p, "VmHWM:")).collect();
    if let (Some(max), Some(hwm)) = (rss.iter().max(), peak.iter().max()) {
        let part =
            |key: &str| pids.iter().filter_map(|p| kib(*p, key)).max().unwrap_or(0) as f64 / 1024.0;
        println!(
            "resident memory of an idle agent: {:.1} MiB at most (peak {:.1} MiB; of it {:.1} MiB anonymous, {:.1} MiB of the binary and libraries; target 12 MiB)",
            *max as f64 / 1024.0,
            *hwm as f64 / 1024.0,
            part("RssAnon:"),
            part("RssFile:"),
        );
    }
    for m in machines.iter_mut() {
        if let Some(mut c) = m.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    Ok(true)
}

/// How long `host` held a rollout lease, from the API's write log.
fn lease_time(writes: &[api::Write], host: &str) -> Duration {
    let mut total = Duration::ZERO;
    let mut since = None;
    // The rollout's leases only (kube-node-lease holds the kubelets' heartbeats).
    for w in writes
        .iter()
        .filter(|w| w.resource == "leases" && w.namespace == "kube-system")
    {
        let holder = w.object["spec"]["holderIdentity"].as_str();
        match (holder == Some(host), since) {
            (true, None) => since = Some(w.at),
            (false, Some(t)) => {
                total += w.at.duration_since(t).unwrap_or_default();
                since = None;
            }
            _ => {}
        }
    }
    total
}

/// The most nodes cordoned by nk3 at any moment, from the API's write log.
fn max_cordoned(writes: &[api::Write]) -> usize {
    let mut cordoned = std::collections::BTreeSet::new();
    let mut most = 0;
    // Writes come in the order the API committed them, each object as it was then.
    for w in writes.iter().filter(|w| w.resource == "nodes") {
        if w.verb != "delete" && w.object["metadata"]["annotations"]["nk3.io/cordoned"] == "true" {
            cordoned.insert(w.name.clone());
        } else {
            cordoned.remove(&w.name);
        }
        most = most.max(cordoned.len());
    }
    most
}
