//! The NixOS module, `nixos-module/`: evaluated with real Nix against the stand-in `lib` in
//! `tests/nix/`, its unit checked, its ExecStart run through the real binary, and every option
//! it sets checked against NixOS's declarations.

use std::process::Command;

use serde_json::Value;

use crate::options::Options;
use crate::support::{nix_instantiate, root, stderr, stdout};

/// Evaluates the module with these `services.nk3-agent` settings (a Nix attribute set).
fn eval(settings: &str) -> Result<Value, String> {
    let o = nix_instantiate()
        .args(["--eval", "--strict", "--json"])
        .arg(root().join("tests/nix/eval-module.nix"))
        .args(["--arg", "settings", settings])
        .output()
        .expect("nix-instantiate (nix-bin; the test command installs it)");
    if o.status.success() {
        Ok(serde_json::from_slice(&o.stdout).unwrap())
    } else {
        Err(stderr(&o))
    }
}

const MINIMAL: &str = r#"{ enable = true; repository = "ssh://git@git.example.com/infra.git"; }"#;

fn unit(v: &Value) -> &Value {
    &v["config"]["systemd"]["services"]["nk3-agent"]
}

/// Runs the unit's ExecStart with the real binary and `--check`, as systemd would split it.
fn check_exec_start(v: &Value) -> Value {
    let exec = unit(v)["serviceConfig"]["ExecStart"].as_str().unwrap();
    let stand_in = "/nix/store/00000000000000000000000000000000-nk3-agent/bin/nk3-agent";
    assert!(exec.starts_with(stand_in), "{exec}");
    // systemd's quoting of these single-quoted words is the shell's; its doubled `%%`/`$$`
    // become single characters.
    let line = exec
        .replacen(stand_in, "exec \"$0\"", 1)
        .replace("%%", "%")
        .replace("$$", "$");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("{line} --check"))
        .arg(env!("CARGO_BIN_EXE_nk3-agent"))
        .env_clear()
        .output()
        .unwrap();
    assert!(o.status.success(), "{line}: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

#[test]
fn defaults_make_a_unit_that_survives_switches_and_reports_to_systemd() {
    let v = eval(MINIMAL).unwrap();
    assert_eq!(v["failed"], serde_json::json!([]));
    let u = unit(&v);
    assert_eq!(u["after"], serde_json::json!(["network-online.target"]));
    assert_eq!(u["wants"], serde_json::json!(["network-online.target"]));
    assert_eq!(u["wantedBy"], serde_json::json!(["multi-user.target"]));
    assert_eq!(u["restartIfChanged"], false);
    let sc = &u["serviceConfig"];
    assert_eq!(sc["Type"], "notify");
    assert_eq!(sc["Restart"], "always");
    assert!(sc["WatchdogSec"].is_string());
    assert_eq!(sc["StateDirectory"], "nk3-agent");
    let path: Vec<&str> = u["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for tool in ["-nix", "-nixos-rebuild", "-git", "-systemd"] {
        assert!(
            path.iter().any(|p| p.ends_with(tool)),
            "{tool} not in {path:?}"
        );
    }
    assert!(u["environment"]["NIX_PATH"]
        .as_str()
        .unwrap()
        .contains("nixpkgs="));
    assert_eq!(
        v["config"]["environment"]["systemPackages"][0],
        "/nix/store/00000000000000000000000000000000-nk3-agent",
        "nk3-agent status works for operators"
    );
    let s = check_exec_start(&v);
    assert_eq!(s["repo"], "ssh://git@git.example.com/infra.git");
    assert_eq!(s["branch"], "main");
    assert_eq!(s["inventory_path"], "inventory.yaml");
    assert_eq!(s["poll_interval"], "1m");
    assert_eq!(s["state_dir"], "/var/lib/nk3-agent");
    assert_eq!(s["kubeconfig"], "/etc/rancher/k3s/k3s.yaml");
    assert_eq!(s["k3s_data_dir"], "/var/lib/rancher/k3s");
    assert_eq!(s["log_level"], "info");
    assert_eq!(s["node"], Value::Null);
    assert_eq!(s["metrics_address"], Value::Null);
    assert_eq!(s["allow_force_push"], false);
}

#[test]
fn the_metrics_port_is_opened_only_when_asked() {
    let closed =
        eval(r#"{ enable = true; repository = "ssh://h/r"; metrics.enable = true; }"#).unwrap();
    assert!(
        closed["config"]["networking"]["firewall"].is_null(),
        "{}",
        closed["config"]
    );
    let open = eval(
        r#"{ enable = true; repository = "ssh://h/r"; metrics = { enable = true; address = "[::]:9100"; openFirewall = true; }; }"#,
    )
    .unwrap();
    assert_eq!(
        open["config"]["networking"]["firewall"]["allowedTCPPorts"],
        serde_json::json!([9100])
    );
}

#[test]
fn every_option_reaches_the_agent_as_the_flag_it_accepts() {
    let v = eval(
        r#"{
          enable = true;
          repository = "https://oauth2@git.example.com/infra/cluster%20a.git";
          branch = "production";
          inventoryPath = "clusters/edge/inventory.yaml";
          pollInterval = "5m";
          sshKeyFile = "/etc/nk3/deploy key";
          knownHosts = "/etc/nk3/known_hosts";
          tokenFile = "/etc/nk3/token";
          allowedSigners = "/etc/nk3/allowed_signers";
          kubeconfig = "/etc/nk3/kubeconfig";
          k3sDataDir = "/srv/k3s";
          node = "172.30.190.3";
          stateDir = "/var/lib/nk3";
          logLevel = "debug";
          metrics = { enable = true; address = "127.0.0.1:9100"; };
          settings = { allow-force-push = true; git-timeout = "2m"; gpg-home = "/etc/nk3/gnupg$HOME"; };
        }"#,
    )
    .unwrap();
    assert_eq!(v["failed"], serde_json::json!([]));
    assert_eq!(unit(&v)["serviceConfig"]["StateDirectory"], "nk3");
    let s = check_exec_start(&v);
    let want = serde_json::json!({
        "repo": "https://git.example.com/infra/cluster%20a.git",
        "branch": "production",
        "inventory_path": "clusters/edge/inventory.yaml",
        "poll_interval": "5m",
        "ssh_key_file": "/etc/nk3/deploy key",
        "known_hosts": "/etc/nk3/known_hosts",
        "repo_token_file": "/etc/nk3/token",
        "allowed_signers": "/etc/nk3/allowed_signers",
        "kubeconfig": "/etc/nk3/kubeconfig",
        "k3s_data_dir": "/srv/k3s",
        "node": "172.30.190.3",
        "state_dir": "/var/lib/nk3",
        "log_level": "debug",
        "metrics_address": "127.0.0.1:9100",
        "allow_force_push": true,
        "git_timeout": "2m",
        "gpg_home": "/etc/nk3/gnupg$HOME",
    });
    for (k, w) in want.as_object().unwrap() {
        assert_eq!(&s[k], w, "{k}");
    }
}

#[test]
fn assertions_say_what_is_wrong() {
    for (settings, want) in [
        ("{ enable = true; }", "repository must be set"),
        (
            r#"{ enable = true; repository = "https://ci:hunter2@git.example.com/i.git"; }"#,
            "must not carry a password",
        ),
        (
            r#"{ enable = true; repository = "r"; sshKeyFile = "keys/deploy"; }"#,
            "must be absolute paths",
        ),
        (
            r#"{ enable = true; repository = "r"; tokenFile = /etc/passwd; }"#,
            "outside the Nix store",
        ),
        (
            r#"{ enable = true; repository = "r"; sshKeyFile = "/nix/store/abc-key"; }"#,
            "outside the Nix store",
        ),
        (
            r#"{ enable = true; repository = "r"; stateDir = "/srv/nk3"; }"#,
            "under /var/lib",
        ),
        (
            r#"{ enable = true; repository = "r"; stateDir = "/var/lib/../etc"; }"#,
            "under /var/lib",
        ),
    ] {
        let v = eval(settings).unwrap();
        let failed = v["failed"].to_string();
        assert!(failed.contains(want), "{settings}: {failed}");
    }
}

#[test]
fn wrong_types_and_unknown_options_are_refused_by_name() {
    let e = eval(r#"{ enable = true; repository = "r"; logLevel = "loud"; }"#).unwrap_err();
    assert!(e.contains("services.nk3-agent.logLevel"), "{e}");
    let e = eval(r#"{ enable = true; repository = "r"; pollIntervall = "5m"; }"#).unwrap_err();
    assert!(
        e.contains("services.nk3-agent.pollIntervall' does not exist"),
        "{e}"
    );
    let e = eval(r#"{ enable = true; repository = "r"; settings.x = [ 1 ]; }"#).unwrap_err();
    assert!(e.contains("services.nk3-agent.settings"), "{e}");
}

#[test]
fn a_disabled_module_sets_nothing() {
    let v = eval(r#"{ repository = "r"; }"#).unwrap();
    assert_eq!(v["config"], serde_json::json!({}));
}

#[test]
fn every_option_the_module_sets_is_declared_in_nixos_with_a_compatible_type() {
    let v = eval(MINIMAL).unwrap();
    let opts = Options::load();
    let mut problems = Vec::new();
    let systemd = serde_json::json!({ "systemd": v["config"]["systemd"] });
    for (k, val) in systemd.as_object().unwrap() {
        opts.child("", k, val, &mut problems);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The checker sees these options: a misspelt one is caught.
    let mut wrong = systemd.clone();
    wrong["systemd"]["services"]["nk3-agent"]["restartIfChangd"] = Value::Bool(false);
    let mut problems = Vec::new();
    opts.child("", "systemd", &wrong["systemd"], &mut problems);
    assert!(
        problems.join("\n").contains("restartIfChangd"),
        "{problems:?}"
    );
}

#[test]
fn every_nix_file_parses() {
    let mut files = Vec::new();
    for dir in ["nixos-module", "examples/bootstrap", "tests/nix", "nix"] {
        let Ok(entries) = std::fs::read_dir(root().join(dir)) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "nix") {
                files.push(p);
            }
        }
    }
    files.push(root().join("flake.nix"));
    assert!(files.len() >= 5, "{files:?}");
    for f in files {
        let o = nix_instantiate().arg("--parse").arg(&f).output().unwrap();
        assert!(o.status.success(), "{}: {}", f.display(), stderr(&o));
    }
}
