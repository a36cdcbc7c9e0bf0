//! Writing values as Nix source, so that a value can only ever be a value.

use serde_json::Value;

/// `s` as a Nix double-quoted string literal that reads back as exactly `s`.
///
/// `"` and `\` are escaped, and so is every `$`, which keeps `${` from starting an
/// interpolation; control characters are written as escapes.
pub fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '$' => out.push_str("\\$"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON value as a Nix expression: strings as [`string`] literals, lists as `[ … ]`,
/// objects as attribute sets with quoted names.
pub fn value(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => number(n),
        Value::String(s) => string(s),
        Value::Array(items) if items.is_empty() => "[ ]".into(),
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(value).collect();
            format!("[ {} ]", inner.join(" "))
        }
        Value::Object(m) if m.is_empty() => "{ }".into(),
        Value::Object(m) => {
            let inner: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{} = {};", string(k), value(v)))
                .collect();
            format!("{{ {} }}", inner.join(" "))
        }
    }
}

/// A number as Nix reads it: a negative one in parentheses (`[ 1 -5 ]` would be `1 - 5`),
/// a float always with a point and never an exponent (`1e20` is no Nix literal), an integer
/// beyond Nix's 64-bit range as a float.
fn number(n: &serde_json::Number) -> String {
    let text = if let Some(i) = n.as_i64() {
        i.to_string()
    } else {
        // u64 beyond i64, or a float; Rust writes floats without an exponent.
        let f = n.as_f64().unwrap_or(0.0);
        let mut t = f.to_string();
        if !t.contains('.') {
            t.push_str(".0");
        }
        t
    };
    if text.starts_with('-') {
        format!("({text})")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_cannot_escape_their_quotes() {
        assert_eq!(string(r#"a"b\c${d}$e''f"#), r#""a\"b\\c\${d}\$e''f""#);
        assert_eq!(string("x\ny"), r#""x\ny""#);
    }

    #[test]
    fn values_become_nix_expressions() {
        assert_eq!(
            value(&json!([1, "a", true, null])),
            r#"[ 1 "a" true null ]"#
        );
        assert_eq!(value(&json!({"k": ["v"]})), r#"{ "k" = [ "v" ]; }"#);
        assert_eq!(value(&json!([])), "[ ]");
    }

    #[test]
    fn numbers_read_back_as_the_numbers_they_are() {
        assert_eq!(value(&json!([1, -5])), "[ 1 (-5) ]");
        assert_eq!(value(&json!(1e20)), "100000000000000000000.0");
        assert_eq!(value(&json!(-0.5)), "(-0.5)");
        assert_eq!(value(&json!(2.5e-3)), "0.0025");
        assert_eq!(value(&json!(u64::MAX)), "18446744073709552000.0");
    }
}
