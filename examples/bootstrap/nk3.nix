# /etc/nixos/nk3.nix — the one file an operator writes on a fresh NixOS box, next to the
# installer's configuration.nix and hardware-configuration.nix. Add `./nk3.nix` to the
# imports of configuration.nix, run `nixos-rebuild switch` once, and the agent takes over:
# from then on it writes configuration.nix itself (its rendering imports this file again).
{ ... }:

let
  # Pin nk3 to a release, by its content: `nix-prefetch-url --unpack <url>` prints the hash
  # (a wrong one fails the build and shows the right one, so nothing unpinned is ever used).
  # `nix flake` users import the flake's nixosModules.default instead.
  nk3 = builtins.fetchTarball {
    url = "https://github.com/nk3/nk3/archive/v0.1.0.tar.gz";
    sha256 = "0000000000000000000000000000000000000000000000000000";
  };
in
{
  imports = [ "${nk3}/nixos-module" ];

  nixpkgs.overlays = [
    (final: prev: { nk3-agent = final.callPackage "${nk3}/nix/package.nix" { }; })
  ];

  services.nk3-agent = {
    enable = true;
    repository = "ssh://git@git.example.com/infra/cluster.git";
    # A deploy key with read access, put there by hand (never in the Nix store).
    sshKeyFile = "/etc/nk3/deploy-key";
    knownHosts = "/etc/nk3/known_hosts";
    # Optional: only apply commits signed by these keys.
    # allowedSigners = "/etc/nk3/allowed_signers";
  };
}
