# Options of services.nk3-agent. Every option maps to one nk3-agent setting (README, "Settings");
# the defaults here are the agent's own.
{ lib, pkgs, ... }:

let
  inherit (lib) mkOption mkEnableOption types literalExpression;
  absolutePath = types.either types.path types.str;
in
{
  options.services.nk3-agent = {
    enable = mkEnableOption "nk3-agent, which keeps this NixOS k3s node in the state its git repository declares";

    package = mkOption {
      type = types.package;
      default = pkgs.nk3-agent;
      defaultText = literalExpression "pkgs.nk3-agent";
      description = "The nk3-agent package (the flake's overlay provides `pkgs.nk3-agent`).";
    };

    repository = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "ssh://git@git.example.com/infra/cluster.git";
      description = ''
        The git repository holding `inventory.yaml` (`https://`, `ssh://`, `git://` or a path).
        Credentials never go in the URL: use `sshKeyFile` or `tokenFile`.
      '';
    };

    branch = mkOption {
      type = types.str;
      default = "main";
      description = "The branch to follow.";
    };

    inventoryPath = mkOption {
      type = types.str;
      default = "inventory.yaml";
      description = "Path of the inventory inside the repository; custom templates are read relative to its folder.";
    };

    pollInterval = mkOption {
      type = types.str;
      default = "60s";
      example = "5m";
      description = "Time between polls of the repository (a random tenth is added so nodes do not poll in step).";
    };

    sshKeyFile = mkOption {
      type = types.nullOr absolutePath;
      default = null;
      example = "/etc/nk3/deploy-key";
      description = "SSH private key for an `ssh://` repository. Kept outside the Nix store: give a path, not a key.";
    };

    knownHosts = mkOption {
      type = types.nullOr absolutePath;
      default = null;
      example = "/etc/nk3/known_hosts";
      description = "known_hosts file that must list the repository server's SSH key. Unset: the system's (`programs.ssh.knownHosts`); an unknown host is always refused.";
    };

    tokenFile = mkOption {
      type = types.nullOr absolutePath;
      default = null;
      example = "/etc/nk3/repo-token";
      description = "File holding an HTTPS access token for the repository; the user name comes from the URL.";
    };

    allowedSigners = mkOption {
      type = types.nullOr absolutePath;
      default = null;
      example = "/etc/nk3/allowed_signers";
      description = ''
        SSH allowed-signers file (the format of `gpg.ssh.allowedSignersFile`). When set, only
        commits signed by one of these keys are applied; others are refused and reported.
      '';
    };

    kubeconfig = mkOption {
      type = absolutePath;
      default = "/etc/rancher/k3s/k3s.yaml";
      example = "/var/lib/nk3-agent/kubeconfig";
      description = ''
        Credentials for the k3s API. On servers, the file k3s writes. An agent-role node has
        none: make one on a server with `nk3-agent credentials <hostname>`, copy it to the node
        (mode 0600) and name it here. Without it an agent node builds each commit and waits,
        never switching outside the rollout lease.
      '';
    };

    k3sDataDir = mkOption {
      type = absolutePath;
      default = "/var/lib/rancher/k3s";
      description = ''
        k3s's data directory (set it if k3s runs with `--data-dir`). The certificates k3s keeps
        there once it joined a cluster tell the agent this machine is a member, which never
        switches outside the rollout lease; only a machine without them applies at once.
      '';
    };

    node = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "172.30.190.3";
      description = ''
        This machine's node in the inventory (its address as written there, or its hostname).
        `null`: found from the SMBIOS UUID, the interface addresses, then the hostname.
      '';
    };

    stateDir = mkOption {
      type = types.str;
      default = "/var/lib/nk3-agent";
      description = "The agent's directory (git clone, state.json, lock, token file, backups). Must be under /var/lib.";
    };

    logLevel = mkOption {
      type = types.enum [ "error" "warn" "info" "debug" ];
      default = "info";
      description = "How much the agent writes to the journal.";
    };

    metrics = {
      enable = mkEnableOption "the Prometheus metrics endpoint (`/metrics`)";
      address = mkOption {
        type = types.str;
        default = "127.0.0.1:9469";
        description = "Address and port the metrics endpoint listens on.";
      };
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the metrics port in the firewall (for a Prometheus elsewhere; set `address` to one it reaches, e.g. `0.0.0.0:9469`).";
      };
    };

    settings = mkOption {
      type = types.attrsOf (types.oneOf [ types.str types.int types.bool ]);
      default = { };
      example = literalExpression ''{ allow-force-push = true; git-timeout = "2m"; }'';
      description = ''
        Further nk3-agent settings, by flag name without the dashes: `true` passes the flag,
        `false` leaves it out, anything else is passed as its value.
      '';
    };
  };
}
