//! The pin directory: where the maps and links live on bpffs, re-adopting
//! a pinned link, and removing everything (`mesh-agent uninstall`).
//!
//! ```text
//! maps/<MAP NAME>            every map, reused by the next agent
//! links/<program>            the cgroup links (connect4/6, sock_ops, getpeername4/6)
//! links/sk_lookup/<cookie>   one sk_lookup link per enrolled pod netns
//! ```
//!
//! Links stay pinned when the agent stops, so captured traffic fails closed
//! instead of leaking plaintext; the next agent swaps its programs into the
//! same links atomically (`BPF_LINK_UPDATE`).
#![forbid(unsafe_code)]

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::programs::links::FdLink;

use super::{
    error::{DatapathError, io_err},
    sys,
};

/// Where the agent pins its programs and maps unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/mesh";

/// The layout under one pin directory.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// The layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The pin directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of the maps.
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// The pin of the map `name`.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    /// The directory of the cgroup programs' links.
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The link of the cgroup program `program`.
    pub fn link(&self, program: &str) -> PathBuf {
        self.links().join(program)
    }

    /// The directory of the per-netns `sk_lookup` links.
    pub fn sk_lookup_links(&self) -> PathBuf {
        self.links().join("sk_lookup")
    }

    /// The `sk_lookup` link of the netns `cookie`.
    pub fn sk_lookup_link(&self, cookie: u64) -> PathBuf {
        self.sk_lookup_links().join(cookie.to_string())
    }

    /// Creates the directories (those that are missing).
    pub fn create(&self) -> Result<(), DatapathError> {
        for dir in [self.maps(), self.links(), self.sk_lookup_links()] {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(())
    }

    /// Netns cookies with a pinned `sk_lookup` link.
    pub fn sk_lookup_cookies(&self) -> Result<Vec<u64>, DatapathError> {
        let dir = self.sk_lookup_links();
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            if let Some(cookie) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(cookie);
            }
        }
        Ok(out)
    }
}

/// Swaps `prog` into the link pinned at `pin`. Returns false (and removes a
/// dead pin) when there is no usable pinned link.
pub fn replace_pinned(pin: &Path, prog: &impl AsFd) -> Result<bool, DatapathError> {
    if !pin.exists() {
        return Ok(false);
    }
    let link = sys::obj_get(pin).map_err(|e| DatapathError::Pinned {
        path: pin.to_owned(),
        message: e.to_string(),
    })?;
    match sys::link_update(link.as_fd(), prog.as_fd()) {
        Ok(()) => {
            tracing::debug!(pin = %pin.display(), "re-adopted pinned link");
            Ok(true)
        }
        Err(e) => {
            // The link's target is gone (cgroup removed, netns destroyed):
            // drop the stale pin and attach afresh.
            tracing::warn!(pin = %pin.display(), error = %e, "pinned link unusable; attaching anew");
            std::fs::remove_file(pin).map_err(io_err(pin))?;
            Ok(false)
        }
    }
}

/// Pins `link` at `pin`, so it outlives the agent.
pub fn pin_link(link: FdLink, pin: &Path) -> Result<(), DatapathError> {
    link.pin(pin).map(drop).map_err(|e| DatapathError::Pinned {
        path: pin.to_owned(),
        message: e.to_string(),
    })
}

/// Removes the link pinned at `pin` (if any).
pub fn unpin_link(pin: &Path) -> Result<(), DatapathError> {
    if !pin.exists() {
        return Ok(());
    }
    // Removing the last reference (the pin) detaches the link.
    std::fs::remove_file(pin).map_err(io_err(pin))
}

/// Removes everything the agent pinned under `pin_dir`: links first (which
/// detaches the programs), then maps. Captured pods get direct traffic again.
pub fn uninstall(pin_dir: &Path) -> Result<usize, DatapathError> {
    let mut removed = 0;
    if !pin_dir.exists() {
        return Ok(0);
    }
    let pins = PinLayout::new(pin_dir);
    let dirs = [pins.sk_lookup_links(), pins.links(), pins.maps()];
    for dir in &dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries {
            let entry = entry.map_err(io_err(dir))?;
            let path = entry.path();
            if path.is_dir() {
                continue;
            }
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            removed += 1;
        }
    }
    for dir in dirs.iter().map(PathBuf::as_path).chain([pin_dir]) {
        if dir.exists() {
            std::fs::remove_dir(dir).map_err(io_err(dir))?;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_the_documented_one() {
        let pins = PinLayout::new("/sys/fs/bpf/mesh");
        assert_eq!(pins.maps(), Path::new("/sys/fs/bpf/mesh/maps"));
        assert_eq!(
            pins.link("redirect_connect4"),
            Path::new("/sys/fs/bpf/mesh/links/redirect_connect4")
        );
        assert_eq!(
            pins.sk_lookup_link(42),
            Path::new("/sys/fs/bpf/mesh/links/sk_lookup/42")
        );
    }

    #[test]
    fn uninstall_removes_the_pins_and_their_directories() {
        let root = std::env::temp_dir().join(format!("mesh-pins-test-{}", std::process::id()));
        let pins = PinLayout::new(&root);
        pins.create().expect("create");
        for file in [pins.map("COUNTERS"), pins.link("p"), pins.sk_lookup_link(7)] {
            std::fs::write(&file, b"").expect("write");
        }
        assert_eq!(pins.sk_lookup_cookies().expect("cookies"), vec![7]);
        assert_eq!(uninstall(&root).expect("uninstall"), 3);
        assert!(!root.exists());
        assert_eq!(uninstall(&root).expect("again"), 0);
    }
}
