//! The test kit for the agent: real git repositories (a bare "server" repository and a work
//! clone to commit from, optionally served by `git daemon` on loopback) and simulated nodes
//! (a temporary root with /etc/nixos, the state directory, the running and booted system
//! links and a boot id), on which the real `nk3-agent` runs with the stand-in `nixos-rebuild`,
//! `systemctl` and `nix-channel` of `tests/bin`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{root, stderr};

/// Runs git, panicking with its output if it fails.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "nk3 test")
        .env("GIT_AUTHOR_EMAIL", "test@nk3.invalid")
        .env("GIT_COMMITTER_NAME", "nk3 test")
        .env("GIT_COMMITTER_EMAIL", "test@nk3.invalid")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("git is needed (the test command installs it)");
    assert!(
        o.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A bare repository and a work clone of it.
pub struct Repo {
    _dir: tempfile::TempDir,
    /// The bare repository (what the agent clones).
    pub bare: PathBuf,
    /// The work clone tests commit in.
    pub work: PathBuf,
}

impl Repo {
    /// A repository whose `main` has one commit with `inventory.yaml`.
    pub fn with_inventory(inventory: &str) -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let bare = dir.path().join("infra.git");
        let work = dir.path().join("work");
        git(
            dir.path(),
            &["init", "-q", "--bare", "-b", "main", "infra.git"],
        );
        git(dir.path(), &["clone", "-q", "infra.git", "work"]);
        git(&work, &["checkout", "-q", "-b", "main"]);
        let r = Repo {
            _dir: dir,
            bare,
            work,
        };
        r.commit("inventory.yaml", inventory, "initial inventory");
        r
    }

    /// The URL the agent uses (a local path: git2's local transport).
    pub fn url(&self) -> String {
        self.bare.display().to_string()
    }

    /// Writes a file, commits and pushes it; returns the new commit.
    pub fn commit(&self, path: &str, text: &str, message: &str) -> String {
        let file = self.work.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, text).unwrap();
        git(&self.work, &["add", path]);
        git(
            &self.work,
            &["commit", "-q", "--allow-empty", "-m", message],
        );
        git(&self.work, &["push", "-q", "origin", "main"]);
        self.head()
    }

    /// Like [`Repo::commit`], signed with the SSH key `key` (a private key file).
    pub fn commit_signed(&self, path: &str, text: &str, message: &str, key: &Path) -> String {
        let file = self.work.join(path);
        std::fs::write(&file, text).unwrap();
        git(&self.work, &["add", path]);
        let signing_key = format!("user.signingkey={}", key.display());
        git(
            &self.work,
            &[
                "-c",
                "gpg.format=ssh",
                "-c",
                &signing_key,
                "commit",
                "-q",
                "-S",
                "--allow-empty",
                "-m",
                message,
            ],
        );
        git(&self.work, &["push", "-q", "origin", "main"]);
        self.head()
    }

    /// The work clone's head.
    pub fn head(&self) -> String {
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// Rewrites the branch: resets to the first commit, commits `text` there, force-pushes.
    pub fn force_push(&self, text: &str) -> String {
        let first = git(&self.work, &["rev-list", "--max-parents=0", "HEAD"]);
        git(&self.work, &["reset", "-q", "--hard", &first]);
        std::fs::write(self.work.join("inventory.yaml"), text).unwrap();
        git(&self.work, &["commit", "-q", "-am", "rewritten history"]);
        git(&self.work, &["push", "-q", "--force", "origin", "main"]);
        self.head()
    }
}

/// `git daemon` serving a repository's parent folder on a loopback port.
pub struct Daemon {
    child: Child,
    /// The port it listens on.
    pub port: u16,
    base: PathBuf,
}

impl Daemon {
    /// Serves `repo` at `git://127.0.0.1:<port>/infra.git`.
    pub fn serve(repo: &Repo) -> Daemon {
        let base = repo.bare.parent().unwrap().to_path_buf();
        let port = nk3_controlplane::unused_port();
        let mut d = Daemon {
            child: Daemon::spawn(&base, port),
            port,
            base,
        };
        d.wait_ready();
        d
    }

    fn spawn(base: &Path, port: u16) -> Child {
        // `git daemon` runs git-daemon as a child; start it directly so that stopping it
        // really closes the port.
        let exec_path = git(base, &["--exec-path"]);
        Command::new(Path::new(&exec_path).join("git-daemon"))
            .arg("--reuseaddr")
            .arg("--export-all")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon")
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "git daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The repository's git:// URL.
    pub fn url(&self) -> String {
        format!("git://127.0.0.1:{}/infra.git", self.port)
    }

    /// Stops serving (the remote becomes unreachable).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Serves again on the same port.
    pub fn start(&mut self) {
        self.child = Daemon::spawn(&self.base, self.port);
        self.wait_ready();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The configuration.nix the NixOS installer leaves, as far as nk3 cares: the imports an
/// operator adds for nk3, and the release the machine was installed with.
pub const INSTALLER_CONFIG: &str = "# written by the installer\n{ ... }: {\n  imports = [ ./hardware-configuration.nix ./nk3.nix ];\n  system.stateVersion = \"23.11\"; # Did you read the comment?\n}\n";

/// A simulated node: a temporary root the agent works in.
pub struct Node {
    _dir: tempfile::TempDir,
    /// The root.
    pub root: PathBuf,
    /// The repository URL the agent follows.
    pub repo: String,
    /// Identity override (`--node`); empty: the agent finds the machine itself.
    pub node: String,
    /// Extra environment for the agent.
    pub env: Vec<(String, String)>,
}

impl Node {
    /// A node that will follow `repo` as the inventory's node `node`, running an initial
    /// system (an installer-made NixOS, say) with the operator's files in /etc/nixos.
    pub fn new(repo: &str, node: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        for d in [
            "etc/nixos",
            "var/lib/nk3-agent",
            "run",
            "nix/store/0000-initial-system",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let initial = root.join("nix/store/0000-initial-system");
        std::fs::write(initial.join("kernel"), "linux 6.6.1 (installer)").unwrap();
        std::fs::write(initial.join("initrd"), "initrd").unwrap();
        std::fs::write(initial.join("kernel-params"), "").unwrap();
        std::os::unix::fs::symlink(&initial, root.join("run/current-system")).unwrap();
        std::os::unix::fs::symlink(&initial, root.join("run/booted-system")).unwrap();
        std::fs::write(
            root.join("boot_id"),
            "11111111-1111-1111-1111-111111111111\n",
        )
        .unwrap();
        std::fs::write(
            root.join("etc/nixos/hardware-configuration.nix"),
            "{ ... }: { }\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/nixos/configuration.nix"), INSTALLER_CONFIG).unwrap();
        Node {
            _dir: dir,
            root,
            repo: repo.to_string(),
            node: node.to_string(),
            env: Vec::new(),
        }
    }

    /// `nk3-agent <args>` set up for this node: every path and command a setting.
    pub fn agent(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nk3-agent"));
        c.current_dir(&self.root);
        for (k, _) in std::env::vars() {
            if k.starts_with("NK3_") || k == "JOURNAL_STREAM" {
                c.env_remove(k);
            }
        }
        let bin = root().join("tests/bin");
        let r = &self.root;
        c.args(args)
            .env("NK3_REPO", &self.repo)
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
            .env("NK3_ROUTE_TABLE", r.join("route"))
            .env("NK3_ROUTE6_TABLE", r.join("ipv6_route"))
            .env("NK3_FAKE_ROOT", r)
            // No k3s ran on a fresh node: no kubeconfig and nothing in k3s's data directory
            // (tests of a cluster write them, see `Node::k3s_joined`).
            .env("NK3_KUBECONFIG", r.join("etc/rancher/k3s/k3s.yaml"))
            .env("NK3_K3S_DATA_DIR", r.join("var/lib/rancher/k3s"))
            .env("NK3_POLL_INTERVAL", "100ms");
        if !self.node.is_empty() {
            c.env("NK3_NODE", &self.node);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// k3s joins the cluster on this machine: the kubelet's client certificate a server
    /// signed lands in k3s's data directory (on every node, agent or server).
    pub fn k3s_joined(&self) {
        let dir = self.root.join("var/lib/rancher/k3s/agent");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("client-kubelet.crt"), "certificate\n").unwrap();
    }

    /// `nk3-agent run --once`, and its output.
    pub fn run_once(&self) -> Output {
        self.agent(&["run", "--once"]).output().unwrap()
    }

    /// `run --once`, which must succeed; returns its log.
    pub fn pass_ok(&self) -> String {
        let o = self.run_once();
        assert!(o.status.success(), "run --once failed:\n{}", stderr(&o));
        stderr(&o)
    }

    /// The node's configuration.nix.
    pub fn config(&self) -> String {
        std::fs::read_to_string(self.root.join("etc/nixos/configuration.nix")).unwrap()
    }

    /// Path of the node's configuration.nix.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("etc/nixos/configuration.nix")
    }

    /// state.json.
    pub fn state(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.root.join("var/lib/nk3-agent/state.json"))
            .expect("state.json");
        serde_json::from_str(&text).unwrap()
    }

    /// The running system's store path.
    pub fn current_system(&self) -> PathBuf {
        std::fs::canonicalize(self.root.join("run/current-system")).unwrap()
    }

    /// The argument lines a stand-in was called with (`nixos-rebuild`, `systemctl`, …).
    pub fn calls(&self, tool: &str) -> Vec<String> {
        std::fs::read_to_string(self.root.join(format!("{tool}.log")))
            .unwrap_or_default()
            .lines()
            .map(|l| l.replace(&self.root.display().to_string(), "$ROOT"))
            .collect()
    }

    /// Forgets the stand-ins' call logs.
    pub fn clear_calls(&self) {
        for t in ["nixos-rebuild", "systemctl", "nix-channel"] {
            let _ = std::fs::remove_file(self.root.join(format!("{t}.log")));
        }
    }
}

/// A child process killed when the test ends, even when it fails.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits at most `limit` for `child` (its stderr piped), killed if it runs longer: how it
/// ended and what it printed on stderr, or `None` when it had to be killed.
pub fn stderr_within(
    mut child: Child,
    limit: Duration,
) -> Option<(std::process::ExitStatus, String)> {
    let mut err = child.stderr.take().expect("stderr piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Some((status, reader.join().unwrap()))
}
