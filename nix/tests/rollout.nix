# NixOS VM test, modelled on nixpkgs' nixos/tests/k3s/multi-node.nix: three k3s servers,
# each running nk3-agent, following a bare git repository that server1 serves with
# git daemon. The test pushes an inventory change and checks every node applies it; then it
# pushes a configuration Nix rejects and checks every node keeps what it runs and reports the
# rejected commit; then a generation whose k3s does not start, which the first node to take
# the lease rolls back and halts for everyone.
#
# Run with `nix flake check` (or `nix build .#checks.x86_64-linux.rollout`) on a machine with
# KVM. Not run on the machines nk3 is developed on (no KVM, no nixpkgs there).
{ pkgs, nk3Module, nk3Source }:

let
  inherit (pkgs) lib;
  token = "nk3-vm-test-token";
  nodes = {
    server1 = "192.168.1.1";
    server2 = "192.168.1.2";
    server3 = "192.168.1.3";
  };
  inventory = extra: ''
    cluster:
      join_address: 192.168.1.1
      join_token: ${token}
      default_gateway: 192.168.1.254
      rollout:
        reboot: when-needed
      template: vm.nix.hbs
      nodes:
        192.168.1.1: { initiator: true, interface: eth1 }
        192.168.1.2: { interface: eth1 }
        192.168.1.3: { interface: eth1 }
    ${extra}
  '';
  # The template the agent renders in the VMs: the test machine's own settings (a VM has no
  # boot disk to install a boot loader on), plus what the inventory says.
  template = pkgs.writeText "vm.nix.hbs" ''
    { config, lib, pkgs, modulesPath, ... }:
    {
      imports = [ ./hardware-configuration.nix ./nk3.nix ];
      networking.hostName = {{node.hostname}};
      networking.nameservers = {{nix cluster.nameservers}};
      services.k3s = {
        enable = true;
        role = {{node.role}};
        tokenFile = {{cluster.token_file}};
        {{#if node.initiator}}clusterInit = true;{{else}}serverAddr = {{cluster.server_url}};{{/if}}
        extraFlags = {{nix node.k3s_flags}};
      };
    }
  '';

  # What a node runs, both as booted by the test and as the agent rebuilds it: the VM's
  # "hardware" (qemu and the test driver's instrumentation) and the operator's nk3.nix.
  hardware = ip: ''
    { modulesPath, lib, ... }:
    {
      imports = [
        "''${modulesPath}/virtualisation/qemu-vm.nix"
        "''${modulesPath}/testing/test-instrumentation.nix"
      ];
      virtualisation.memorySize = 2048;
      virtualisation.diskSize = 8192;
      virtualisation.writableStore = true;
      networking.interfaces.eth1.ipv4.addresses = lib.mkForce [ { address = "${ip}"; prefixLength = 24; } ];
      networking.firewall.enable = false;
      nix.nixPath = [ "nixpkgs=${pkgs.path}" ];
      nix.settings.substituters = lib.mkForce [ ];
    }
  '';
  nk3Nix = ip: ''
    { pkgs, ... }:
    {
      imports = [ ${nk3Source}/nixos-module ];
      nixpkgs.overlays = [ (final: prev: { nk3-agent = final.callPackage ${nk3Source}/nix/package.nix { }; }) ];
      environment.systemPackages = [ pkgs.git pkgs.jq ];
      services.nk3-agent = {
        enable = true;
        repository = "git://192.168.1.1/infra.git";
        node = "${ip}";
        pollInterval = "5s";
        settings.git-timeout = "10s";
      };
    }
  '';

  node = name: ip: { config, pkgs, ... }: {
    imports = [ nk3Module ];
    # Building a new generation inside the VM needs no network: everything the build needs
    # is put in the VM's store (as nixpkgs' own nixos-rebuild tests do).
    system.includeBuildDependencies = true;
    virtualisation.memorySize = 2048;
    virtualisation.diskSize = 8192;
    virtualisation.writableStore = true;
    networking.interfaces.eth1.ipv4.addresses = lib.mkForce [{ address = ip; prefixLength = 24; }];
    networking.firewall.enable = false;
    nix.nixPath = [ "nixpkgs=${pkgs.path}" ];
    nix.settings.substituters = lib.mkForce [ ];
    environment.etc."nixos/hardware-configuration.nix".text = hardware ip;
    environment.etc."nixos/nk3.nix".text = nk3Nix ip;
    environment.systemPackages = [ pkgs.git pkgs.jq ];
    services.nk3-agent = {
      enable = true;
      repository = "git://192.168.1.1/infra.git";
      node = ip;
      pollInterval = "5s";
      settings.git-timeout = "10s";
    };
    services.k3s.enable = true;
    services.k3s.tokenFile = "/var/lib/nk3-agent/join-token";
  };
in
pkgs.testers.runNixOSTest {
  name = "nk3-rollout";
  nodes = lib.mapAttrs node nodes;

  testScript = ''
    import json

    def status(m):
        return json.loads(m.succeed("nk3-agent status --json || true"))

    def applied(m):
        return (status(m).get("state") or {}).get("applied")

    start_all()
    server1.succeed(
        "mkdir -p /srv/git && git init -q --bare -b main /srv/git/infra.git",
        "git clone -q /srv/git/infra.git /root/work",
        "git -C /root/work checkout -q -b main",
        "cp ${template} /root/work/vm.nix.hbs",
        "cat > /root/work/inventory.yaml <<'EOF'\n${inventory ""}EOF",
        "git -C /root/work add -A",
        "git -C /root/work -c user.name=t -c user.email=t@t commit -q -m initial",
        "git -C /root/work push -q origin main",
    )
    server1.succeed("systemd-run --unit git-daemon git daemon --reuseaddr --export-all --base-path=/srv/git /srv/git")
    server1.wait_for_open_port(9418)

    head = server1.succeed("git -C /root/work rev-parse HEAD").strip()
    for m in [server1, server2, server3]:
        m.wait_for_unit("nk3-agent.service")
        m.wait_until_succeeds(f"nk3-agent status --json | jq -e '.state.applied == \"{head}\"'", timeout=900)
        m.succeed("test $(stat -c %a /var/lib/nk3-agent/join-token) = 600")
        m.succeed("grep -q 'Generated by nk3' /etc/nixos/configuration.nix")
        m.succeed("journalctl -u nk3-agent | grep -q 'Rebuilding NixOS on'")

    with subtest("a pushed change rolls through every node"):
        server1.succeed(
            "sed -i 's/^  default_gateway: .*/&\\n  nameservers: [ 9.9.9.9 ]/' /root/work/inventory.yaml",
            "git -C /root/work -c user.name=t -c user.email=t@t commit -q -am 'another resolver'",
            "git -C /root/work push -q origin main",
        )
        head = server1.succeed("git -C /root/work rev-parse HEAD").strip()
        for m in [server1, server2, server3]:
            m.wait_until_succeeds(f"nk3-agent status --json | jq -e '.state.applied == \"{head}\"'", timeout=900)
            m.succeed("grep -q 9.9.9.9 /etc/resolv.conf")

    with subtest("a configuration Nix rejects changes nothing"):
        before = {m.name: m.succeed("sha256sum /etc/nixos/configuration.nix") for m in [server1, server2, server3]}
        server1.succeed(
            "echo '  broken = ;' >> /root/work/vm.nix.hbs",
            "git -C /root/work -c user.name=t -c user.email=t@t commit -q -am 'a syntax error'",
            "git -C /root/work push -q origin main",
        )
        bad = server1.succeed("git -C /root/work rev-parse HEAD").strip()
        for m in [server1, server2, server3]:
            m.wait_until_succeeds(f"nk3-agent status --json | jq -e '.state.rejected.commit == \"{bad}\"'", timeout=600)
            assert m.succeed("sha256sum /etc/nixos/configuration.nix") == before[m.name]
            m.succeed("journalctl -u nk3-agent | grep -q 'Changes reverted on'")

    with subtest("a generation whose k3s does not start is rolled back and halted for everyone"):
        server1.succeed(
            "git -C /root/work checkout HEAD~1 -- vm.nix.hbs",
            "sed -i 's/^  nodes:/  k3s_extra_flags: [ --no-such-flag ]\\n  nodes:/' /root/work/inventory.yaml",
            "git -C /root/work -c user.name=t -c user.email=t@t commit -q -am 'a flag k3s refuses'",
            "git -C /root/work push -q origin main",
        )
        broken = server1.succeed("git -C /root/work rev-parse HEAD").strip()
        server1.wait_until_succeeds(
            f"k3s kubectl -n kube-system get lease nk3-rollout -o json | jq -e '.metadata.annotations[\"nk3.io/halted-commit\"] == \"{broken}\"'",
            timeout=1800,
        )
        for m in [server1, server2, server3]:
            m.wait_until_succeeds(f"nk3-agent status --json | jq -e '.state.rejected.commit == \"{broken}\"'", timeout=600)
            m.succeed("systemctl is-active k3s.service")
  '';
}
