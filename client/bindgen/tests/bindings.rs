//! The checked-in bindings are current (regenerating them from this build's
//! cdylib changes nothing), and the Kotlin and Swift bindings expose the
//! same API: the same types, and per type the same methods, fields or
//! variants. Swift cannot be compiled here; this is what keeps it honest.
//! Fix a failure with `tools/scripts/gen-bindings.sh`.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `client/`: the SDK crate, its `uniffi.toml` and its checked-in bindings.
fn client_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("client/bindgen sits in client/")
        .to_path_buf()
}

fn kotlin_dir() -> PathBuf {
    client_dir().join("bindings/kotlin/src/main/kotlin")
}

fn swift_dir() -> PathBuf {
    client_dir().join("bindings/swift")
}

/// Every file under `dir` (but READMEs), relative path → contents.
fn files(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n != "README.md") {
                let rel = path.strip_prefix(dir).unwrap().to_path_buf();
                out.insert(rel, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    out
}

fn generate(language: &str, out: &Path) {
    let bindgen = PathBuf::from(env!("CARGO_BIN_EXE_uniffi-bindgen"));
    let lib = bindgen.parent().unwrap().join(format!(
        "{}palaver_client{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    // `cargo test` links the tests against the rlib and does not refresh the
    // cdylib in the target dir: build it, so a fresh checkout (and a changed
    // API) is read from a current library.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "-p", "palaver-client", "--lib"]);
    if bindgen.parent().is_some_and(|d| d.ends_with("release")) {
        build.arg("--release");
    }
    let built = build
        .status()
        .expect("running cargo build -p palaver-client --lib");
    assert!(
        built.success(),
        "cargo build -p palaver-client --lib failed"
    );
    assert!(lib.exists(), "{} not built", lib.display());
    let status = Command::new(&bindgen)
        .args(["generate", "--no-format", "--library"])
        .arg(&lib)
        .args(["--language", language, "--out-dir"])
        .arg(out)
        .current_dir(client_dir())
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "uniffi-bindgen {language}: {}",
        String::from_utf8_lossy(&status.stderr)
    );
}

#[test]
fn checked_in_bindings_are_current() {
    let tmp = std::env::temp_dir().join(format!("palaver-bindings-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for (language, checked_in) in [("kotlin", kotlin_dir()), ("swift", swift_dir())] {
        let out = tmp.join(language);
        generate(language, &out);
        let fresh = files(&out);
        let stored = files(&checked_in);
        assert_eq!(
            fresh.keys().collect::<Vec<_>>(),
            stored.keys().collect::<Vec<_>>(),
            "{language} binding files differ: run tools/scripts/gen-bindings.sh"
        );
        for (path, text) in &fresh {
            assert!(
                stored[path] == *text,
                "{language} binding {} is stale: run tools/scripts/gen-bindings.sh",
                path.display()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Type name → member names (methods, fields or variants), normalised:
/// lower case without underscores, so `sendText`/`sendText` and
/// `UNKNOWN_CONNECTION_ERROR`/`unknownConnectionError` compare equal.
type Api = BTreeMap<String, BTreeSet<String>>;

fn norm(name: &str) -> String {
    name.trim_matches('`').replace('_', "").to_lowercase()
}

/// The identifier at the start of `s` (after optional backticks).
fn ident(s: &str) -> String {
    s.trim_start_matches('`')
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Lines of the block opened on line `start`, up to the closing line at the
/// same indentation.
fn block<'a>(lines: &'a [&'a str], start: usize) -> &'a [&'a str] {
    let end = (start + 1..lines.len())
        .find(|&i| lines[i] == "}" || lines[i].starts_with(')'))
        .unwrap_or(lines.len());
    &lines[start + 1..end]
}

/// Internal machinery both generators emit; not API.
fn internal(name: &str) -> bool {
    name.starts_with("Uniffi")
        || name.starts_with("uniffi")
        || name.starts_with("Ffi")
        || name.starts_with("Rust")
        || name.contains("FfiConverter")
        || name == "NoPointer"
        || name == "InternalException"
        || name == "Disposable"
        || name == "UniffiInternalError"
}

fn kotlin_api(text: &str) -> Api {
    let lines: Vec<&str> = text.lines().collect();
    let mut api = Api::new();
    for (i, line) in lines.iter().enumerate() {
        let (name, members): (String, BTreeSet<String>) = if let Some(rest) =
            line.strip_prefix("public interface ")
        {
            // Objects and callback interfaces: their methods.
            let name = ident(rest);
            let name = name.strip_suffix("Interface").unwrap_or(&name).to_string();
            let members = block(&lines, i)
                .iter()
                .filter_map(|l| l.trim_start().strip_prefix("fun "))
                .map(|l| norm(&ident(l)))
                .collect();
            (name, members)
        } else if let Some(rest) = line.strip_prefix("data class ") {
            let members = block(&lines, i)
                .iter()
                .filter_map(|l| {
                    let t = l.trim_start();
                    t.strip_prefix("var ").or_else(|| t.strip_prefix("val "))
                })
                .map(|l| norm(&ident(l)))
                .collect();
            (ident(rest), members)
        } else if let Some(rest) = line.strip_prefix("enum class ") {
            let members = block(&lines, i)
                .iter()
                .map(|l| l.trim())
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("//")
                        && !l.starts_with("/*")
                        && !l.starts_with('*')
                })
                .take_while(|l| l.ends_with(',') || l.ends_with(';'))
                .map(|l| norm(&ident(l)))
                .collect();
            (ident(rest), members)
        } else if let Some(rest) = line.strip_prefix("sealed class ") {
            // Enums with data and errors: the nested classes are variants.
            let name = ident(rest);
            let name = match name.strip_suffix("Exception") {
                Some(base) => format!("{base}Error"),
                None => name,
            };
            let members = lines[i + 1..]
                .iter()
                .take_while(|l| **l != "}")
                .filter_map(|l| {
                    let nested = l.strip_prefix("    ")?;
                    ["data class ", "class ", "object "]
                        .iter()
                        .find_map(|p| nested.strip_prefix(p))
                })
                .map(|l| norm(&ident(l)))
                .filter(|n| n != "errorhandler")
                .collect();
            (name, members)
        } else if let Some((_, rest)) = line.split_once("fun uniffi_palaver_client_checksum_func_")
        {
            // Top-level functions: the Kotlin text puts annotations and
            // doc comments on their line; their checksum entries
            // (verified when the library loads) name them plainly.
            ("<functions>".into(), BTreeSet::from([norm(&ident(rest))]))
        } else {
            continue;
        };
        if internal(&name) || name.is_empty() {
            continue;
        }
        api.entry(name).or_default().extend(members);
    }
    api
}

fn swift_api(text: &str) -> Api {
    let lines: Vec<&str> = text.lines().collect();
    let mut api = Api::new();
    for (i, line) in lines.iter().enumerate() {
        let (name, members): (String, BTreeSet<String>) =
            if let Some(rest) = line.strip_prefix("public protocol ") {
                let name = ident(rest);
                let name = name.strip_suffix("Protocol").unwrap_or(&name).to_string();
                let members = block(&lines, i)
                    .iter()
                    .filter_map(|l| l.trim_start().strip_prefix("func "))
                    .map(|l| norm(&ident(l)))
                    .collect();
                (name, members)
            } else if let Some(rest) = line.strip_prefix("public struct ") {
                let members = block(&lines, i)
                    .iter()
                    .filter_map(|l| l.strip_prefix("    public var "))
                    .map(|l| norm(&ident(l)))
                    .collect();
                (ident(rest), members)
            } else if let Some(rest) = line.strip_prefix("public enum ") {
                let members = block(&lines, i)
                    .iter()
                    .filter_map(|l| l.strip_prefix("    case "))
                    .map(|l| norm(&ident(l)))
                    .collect();
                (ident(rest), members)
            } else if let Some(rest) = line.strip_prefix("public func ") {
                ("<functions>".into(), BTreeSet::from([norm(&ident(rest))]))
            } else {
                continue;
            };
        if internal(&name) || name.is_empty() {
            continue;
        }
        if name == "<functions>"
            && members
                .iter()
                .any(|m| m.starts_with("ffi") || m.starts_with("uniffi"))
        {
            continue;
        }
        api.entry(name).or_default().extend(members);
    }
    api
}

#[test]
fn kotlin_and_swift_expose_the_same_api() {
    let kotlin: String = files(&kotlin_dir()).into_values().collect();
    let swift: String = files(&swift_dir())
        .into_iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "swift"))
        .map(|(_, t)| t)
        .collect();
    let k = kotlin_api(&kotlin);
    let s = swift_api(&swift);
    // The parse found the API at all (a silently empty parse proves nothing).
    for (ty, member) in [
        ("PalaverClient", "sendtext"),
        ("PalaverClient", "connect"),
        ("TokenProvider", "fetchtoken"),
        ("EventListener", "onevent"),
        ("ClientStore", "saveoutgoing"),
        ("ChatMessage", "conversationid"),
        ("ClientConfig", "trustedcapem"),
        ("ClientEvent", "messagesent"),
        ("ConnectionState", "connected"),
        ("ErrorCode", "tokenexpired"),
        ("ClientError", "invalidargument"),
        ("<functions>", "directconversationid"),
    ] {
        for (lang, api) in [("kotlin", &k), ("swift", &s)] {
            assert!(
                api.get(ty).is_some_and(|m| m.contains(member)),
                "{lang}: {ty}.{member} not found; parsed {api:#?}"
            );
        }
    }
    assert_eq!(
        k.keys().collect::<Vec<_>>(),
        s.keys().collect::<Vec<_>>(),
        "types differ"
    );
    for (ty, members) in &k {
        assert_eq!(
            members, &s[ty],
            "members of {ty} differ between Kotlin and Swift"
        );
    }
    println!(
        "{} types, {} members, same in Kotlin and Swift",
        k.len(),
        k.values().map(BTreeSet::len).sum::<usize>()
    );
}
