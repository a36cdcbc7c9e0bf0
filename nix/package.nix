# The nk3-agent package: the agent binary, its shell completions and manual page.
{ lib
, rustPlatform
, pkg-config
, installShellFiles
, stdenv
, git
, nix
, openssh
}:

let
  workspace = (lib.importTOML ../Cargo.toml).workspace.package;
in
rustPlatform.buildRustPackage {
  pname = "nk3-agent";
  inherit (workspace) version;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../common
      ../agent
      ../tests
      ../examples
      ../nixos-module
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [ "--package" "nk3-agent" ];
  cargoTestFlags = [ "--workspace" ];

  # libgit2 and zlib are built from their crates; HTTPS is rustls, SSH the system's ssh:
  # nothing to link.
  nativeBuildInputs = [ pkg-config installShellFiles ];

  # The end-to-end tests run real git (repositories, git daemon on loopback), real Nix
  # (nix-instantiate --parse/--eval, with a private store root), ssh-keygen, ssh and sshd.
  nativeCheckInputs = [ git nix openssh ];
  preCheck = ''
    export HOME=$TMPDIR
    export NIX_REMOTE="local?root=$TMPDIR/nix-root"
    patchShebangs tests/bin
  '';

  postInstall = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    installShellCompletion --cmd nk3-agent \
      --bash <($out/bin/nk3-agent completions bash) \
      --fish <($out/bin/nk3-agent completions fish) \
      --zsh <($out/bin/nk3-agent completions zsh)
    $out/bin/nk3-agent man > nk3-agent.1
    installManPage nk3-agent.1
  '';

  meta = {
    description = "Keeps bare-metal k3s clusters on NixOS in the state one git repository declares";
    homepage = "https://github.com/nk3/nk3";
    license = lib.licenses.mit;
    mainProgram = "nk3-agent";
    platforms = lib.platforms.linux;
  };
}
