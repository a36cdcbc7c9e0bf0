# services.nk3-agent: runs nk3-agent, which keeps this node in the state its git repository
# declares. Import it from the operator's /etc/nixos/nk3.nix (examples/bootstrap/nk3.nix).
{ config, lib, pkgs, ... }:

let
  cfg = config.services.nk3-agent;

  flag = name: value:
    if value == true then [ "--${name}" ]
    else if value == false || value == null then [ ]
    else [ "--${name}" (toString value) ];

  # The agent's command line: every setting is a flag, so `nk3-agent run --check` with the
  # same arguments shows exactly what the service runs with.
  args = [ "run" ]
    ++ flag "repo" cfg.repository
    ++ flag "branch" cfg.branch
    ++ flag "inventory-path" cfg.inventoryPath
    ++ flag "poll-interval" cfg.pollInterval
    ++ flag "state-dir" cfg.stateDir
    ++ flag "node" cfg.node
    ++ flag "kubeconfig" cfg.kubeconfig
    ++ flag "k3s-data-dir" cfg.k3sDataDir
    ++ flag "ssh-key-file" cfg.sshKeyFile
    ++ flag "known-hosts" cfg.knownHosts
    ++ flag "repo-token-file" cfg.tokenFile
    ++ flag "allowed-signers" cfg.allowedSigners
    ++ flag "log-level" cfg.logLevel
    ++ flag "metrics-address" (if cfg.metrics.enable then cfg.metrics.address else null)
    ++ lib.concatLists (lib.mapAttrsToList flag cfg.settings);

  absolute = p: p == null || lib.hasPrefix "/" (toString p);

  # One argument of ExecStart: quoted for systemd's word splitting, with its specifiers
  # (`%`) and variable references (`$`) doubled so they reach the agent as written.
  execArg = a: lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (lib.escapeShellArg a);
in
{
  imports = [ ./options.nix ];

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.repository != null;
        message = "services.nk3-agent.repository must be set: the git repository that holds inventory.yaml.";
      }
      {
        assertion = cfg.repository == null || builtins.match "[a-z+]+://[^/@]*:[^/@]*@.*" cfg.repository == null;
        message = "services.nk3-agent.repository must not carry a password (it would land in the Nix store); use sshKeyFile or tokenFile.";
      }
      {
        assertion = lib.all absolute [ cfg.sshKeyFile cfg.knownHosts cfg.tokenFile cfg.allowedSigners cfg.kubeconfig cfg.k3sDataDir ];
        message = "services.nk3-agent: sshKeyFile, knownHosts, tokenFile, allowedSigners, kubeconfig and k3sDataDir must be absolute paths.";
      }
      {
        assertion = lib.all
          (p: p == null || !(builtins.isPath p || lib.hasPrefix builtins.storeDir (toString p)))
          [ cfg.sshKeyFile cfg.tokenFile ];
        message = "services.nk3-agent: sshKeyFile and tokenFile must name files outside the Nix store, as strings (\"/etc/nk3/key\", not ./key): anything in the store is world-readable.";
      }
      {
        assertion = lib.hasPrefix "/var/lib/" cfg.stateDir && builtins.match ".*/\\.\\.?(/.*)?" cfg.stateDir == null;
        message = "services.nk3-agent.stateDir must be a directory under /var/lib (systemd's StateDirectory creates it).";
      }
    ];

    # Operators run `nk3-agent status` and `nk3-agent plan` on the node.
    environment.systemPackages = [ cfg.package ];

    # The port is what follows the address's last colon (`[::]:9469` too).
    networking = lib.mkIf (cfg.metrics.enable && cfg.metrics.openFirewall) {
      firewall.allowedTCPPorts = [ (lib.toInt (lib.last (lib.splitString ":" cfg.metrics.address))) ];
    };

    systemd.services.nk3-agent = {
      description = "nk3-agent: keeps this node in the state its git repository declares";
      documentation = [ "https://github.com/nk3/nk3#readme" ];
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];

      # A `nixos-rebuild switch` run by the agent itself must not restart the agent: it would
      # kill the process in the middle of the rollout it is driving. A new agent version
      # takes over at the next reboot (or a manual restart); state.json carries everything
      # across.
      restartIfChanged = false;
      stopIfChanged = false;

      # What the agent runs: nixos-rebuild and nix-channel (with nix), git for signature
      # checks (and ssh-keygen for SSH signatures), systemctl for the reboot.
      path = [
        config.nix.package
        config.system.build.nixos-rebuild
        pkgs.git
        pkgs.openssh
        config.systemd.package
      ];

      environment = {
        # nixos-rebuild finds nixpkgs through NIX_PATH, which a service does not inherit.
        NIX_PATH = lib.concatStringsSep ":" config.nix.nixPath;
        # nix-channel keeps root's channels under root's home, where nixos-rebuild looks.
        HOME = "/root";
      };

      serviceConfig = {
        Type = "notify";
        ExecStart = "${lib.getExe cfg.package} ${lib.concatStringsSep " " (map execArg args)}";
        Restart = "always";
        RestartSec = "10s";
        # The agent sends READY=1 once it holds its lock and WATCHDOG=1 every half of this.
        WatchdogSec = "2min";
        # A build may take long; stopping must not wait for it (state.json says where the
        # node is, and the next start resumes).
        TimeoutStopSec = "30s";
        KillMode = "mixed";
        StateDirectory = lib.removePrefix "/var/lib/" cfg.stateDir;
        StateDirectoryMode = "0700";
        UMask = "0077";

        # Hardening that still lets the agent switch and reboot the system. Left out on
        # purpose: ProtectSystem/ProtectHome/ReadOnlyPaths (switch-to-configuration writes
        # /etc, /boot, /nix/var and home directories), PrivateDevices and ProtectKernel*
        # (the boot loader installer needs disks; activation loads modules and sets sysctls),
        # NoNewPrivileges and RestrictSUIDSGID (activation installs setuid wrappers),
        # ProtectHostname (activation sets the hostname), ProtectClock (it implies a device
        # allow-list, which would keep the boot loader installer from the boot disk),
        # RestrictNamespaces (Nix evaluation and builds use namespaces),
        # CapabilityBoundingSet, User/DynamicUser (a switch needs full root), and
        # SystemCallFilter (activation runs arbitrary programs).
        LockPersonality = true;
        RestrictRealtime = true;
        SystemCallArchitectures = "native";
      };
    };
  };
}
