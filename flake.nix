{
  description = "nk3: keeps bare-metal k3s clusters on NixOS in the state one git repository declares";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: lib.genAttrs systems (system: f (import nixpkgs {
        inherit system;
        overlays = [ self.overlays.default ];
      }));
    in
    {
      overlays.default = final: prev: {
        nk3-agent = final.callPackage ./nix/package.nix { };
      };

      packages = forAll (pkgs: {
        nk3-agent = pkgs.nk3-agent;
        default = pkgs.nk3-agent;
      });

      # The module, with the overlay so that `services.nk3-agent.package` has its default.
      nixosModules.default = { ... }: {
        imports = [ ./nixos-module ];
        nixpkgs.overlays = [ self.overlays.default ];
      };

      devShells = forAll (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ pkgs.nk3-agent ];
          packages = [ pkgs.cargo-nextest pkgs.clippy pkgs.rustfmt pkgs.nixpkgs-fmt ];
        };
      });

      formatter = forAll (pkgs: pkgs.nixpkgs-fmt);

      checks = forAll (pkgs: {
        # The package builds and its tests (unit and end to end) pass in the sandbox.
        package = pkgs.nk3-agent;
      } // lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "x86_64-linux") {
        rollout = import ./nix/tests/rollout.nix {
          inherit pkgs;
          nk3Module = self.nixosModules.default;
          nk3Source = self;
        };
      });
    };
}
