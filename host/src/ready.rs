//! The ready file (`maitre serve --ready-file PATH`): how a supervisor, a
//! script or a test learns that maitre serves, and on which addresses,
//! without reading its log. [`crate::serve`] writes it once the plugins are
//! loaded and both listeners are bound, so a client that reads it can connect
//! at once; with `listen = "127.0.0.1:0"` it is also the only way to learn
//! the port the OS picked.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The file's content: `{"listen":"127.0.0.1:P","admin":"127.0.0.1:Q"}`
/// (`admin` is `null` without an admin listener).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    /// The bound client listener.
    pub listen: SocketAddr,
    /// The bound admin listener, if any.
    pub admin: Option<SocketAddr>,
}

/// Writes `ready` to `path` atomically: a temp file in the same folder,
/// renamed over `path`, so a reader sees no file or the whole file.
pub fn write(path: &Path, ready: &Ready) -> std::io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the ready file needs a file name",
        )
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let mut json = serde_json::to_vec(ready).map_err(std::io::Error::other)?;
    json.push(b'\n');
    let written = std::fs::write(&tmp, &json).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> Ready {
        Ready {
            listen: "127.0.0.1:1234".parse().unwrap(),
            admin: Some("127.0.0.1:1235".parse().unwrap()),
        }
    }

    #[test]
    fn writes_the_documented_json_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready.json");
        write(&path, &ready()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"listen\":\"127.0.0.1:1234\",\"admin\":\"127.0.0.1:1235\"}\n"
        );
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 1, "{files:?}");
    }

    #[test]
    fn replaces_a_stale_file_and_writes_null_without_admin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready.json");
        std::fs::write(&path, "stale").unwrap();
        let r = Ready {
            admin: None,
            ..ready()
        };
        write(&path, &r).unwrap();
        let back: Ready = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, r);
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("\"admin\":null")
        );
    }

    #[test]
    fn a_missing_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write(&dir.path().join("no/such/ready.json"), &ready()).is_err());
    }
}
