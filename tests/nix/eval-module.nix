# Evaluates nixos-module/ with the stand-in lib, for tests/it/module.rs:
#   nix-instantiate --eval --strict --json tests/nix/eval-module.nix --arg settings '{ … }'
# `settings` are the user's services.nk3-agent values. The result has the resolved options
# (`cfg`), the messages of failing assertions (`failed`) and the config the module sets.
{ settings ? { } }:
let
  lib = import ./lib.nix;
  pkg = name: { type = "derivation"; inherit name; outPath = "/nix/store/00000000000000000000000000000000-${name}"; meta.mainProgram = name; };
  pkgs = {
    nk3-agent = pkg "nk3-agent";
    git = pkg "git";
    openssh = pkg "openssh";
  };

  # Every option: the user's value, else the default; type-checked like the module system.
  resolve = path: decl: user:
    if lib.isOption decl then
      let
        value = if user.set then user.value else decl.default;
        where = builtins.concatStringsSep "." path;
      in
      if decl.type.check value then value
      else throw "A definition for option `${where}' is not of type `${decl.type.name}'. Definition value: ${builtins.toJSON value}"
    else
      builtins.mapAttrs
        (name: d: resolve (path ++ [ name ]) d (
          if user.set && builtins.isAttrs user.value && user.value ? ${name}
          then { set = true; value = user.value.${name}; }
          else { set = false; }))
        decl;

  module = import ../../nixos-module/default.nix;
  args = { inherit config lib pkgs; };
  top = module args;
  declarations = builtins.foldl' (acc: m: acc // (import m args).options.services) { } top.imports;
  unknown = builtins.filter (n: !(declarations.nk3-agent ? ${n})) (builtins.attrNames settings);
  cfg =
    if unknown != [ ] then throw "The option `services.nk3-agent.${builtins.head unknown}' does not exist."
    else resolve [ "services" "nk3-agent" ] declarations.nk3-agent { set = true; value = settings; };

  config = {
    services.nk3-agent = cfg;
    nix.package = pkg "nix";
    nix.nixPath = [ "nixpkgs=/nix/var/nix/profiles/per-user/root/channels/nixos" "nixos-config=/etc/nixos/configuration.nix" ];
    system.build.nixos-rebuild = pkg "nixos-rebuild";
    systemd.package = pkg "systemd";
  };

  out = lib.pushDownIfs top.config;
in
{
  inherit cfg;
  config = out;
  failed = map (a: a.message) (builtins.filter (a: !a.assertion) (out.assertions or [ ]));
}
