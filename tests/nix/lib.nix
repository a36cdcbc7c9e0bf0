# A small stand-in for the parts of nixpkgs' `lib` that nixos-module/ uses, so the module can
# be evaluated here with Debian's nix-instantiate (there is no nixpkgs on these machines).
# It implements options with defaults and type checks, mkIf, and the string helpers; the
# real module system does much more, which the flake's VM tests exercise.
let
  hasPrefix = p: s: builtins.substring 0 (builtins.stringLength p) s == p;
  type = name: check: { inherit name check; };
  escapeShellArg = arg: "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString arg)}'";
in
rec {
  inherit hasPrefix escapeShellArg;

  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = what: mkOption {
    type = types.bool;
    default = false;
    example = true;
    description = "Whether to enable ${what}.";
  };
  isOption = x: builtins.isAttrs x && (x._type or null) == "option";
  literalExpression = text: { _type = "literalExpression"; inherit text; };
  mkIf = condition: content: { _type = "if"; inherit condition content; };

  # Resolves mkIf everywhere in a module's `config`.
  pushDownIfs = v:
    if builtins.isAttrs v && (v._type or null) == "if" then
      (if v.condition then pushDownIfs v.content else { })
    else if builtins.isAttrs v && !(v ? outPath) then
      builtins.mapAttrs (_: pushDownIfs) v
    else if builtins.isList v then
      map pushDownIfs v
    else v;

  types = rec {
    str = type "string" builtins.isString;
    bool = type "boolean" builtins.isBool;
    int = type "signed integer" builtins.isInt;
    path = type "absolute path" (x: builtins.isPath x || (builtins.isString x && hasPrefix "/" x));
    package = type "package" (x: builtins.isAttrs x && x ? outPath);
    nullOr = t: type "null or ${t.name}" (x: x == null || t.check x);
    either = a: b: type "${a.name} or ${b.name}" (x: a.check x || b.check x);
    oneOf = ts: type (builtins.concatStringsSep " or " (map (t: t.name) ts)) (x: builtins.any (t: t.check x) ts);
    enum = vs: type "one of ${builtins.toJSON vs}" (x: builtins.elem x vs);
    attrsOf = t: type "attribute set of ${t.name}" (x: builtins.isAttrs x && builtins.all t.check (builtins.attrValues x));
  };

  all = builtins.all;
  concatLists = builtins.concatLists;
  concatStringsSep = builtins.concatStringsSep;
  mapAttrsToList = f: attrs: map (n: f n attrs.${n}) (builtins.attrNames attrs);
  removePrefix = p: s: if hasPrefix p s then builtins.substring (builtins.stringLength p) (-1) s else s;
  replaceStrings = builtins.replaceStrings;
  getExe = pkg: "${pkg}/bin/${pkg.meta.mainProgram}";
  escapeShellArgs = args: builtins.concatStringsSep " " (map escapeShellArg args);
  last = l: builtins.elemAt l (builtins.length l - 1);
  splitString = sep: s: builtins.filter builtins.isString (builtins.split (builtins.replaceStrings [ "." ":" ] [ "\\." ":" ] sep) s);
  toInt = s: let n = builtins.fromJSON s; in if builtins.isInt n then n else throw "toInt: ${s} is not an integer";
}
