//! The node's BIRD daemon: started (it daemonizes, so it outlives an agent restart and the
//! sessions stay up; starting the daemon is the one process the agent spawns for it),
//! reconfigured in place through its control socket (`configure check`, then `configure`:
//! unchanged sessions are kept), found again by that socket, and stopped when the state no
//! longer asks for BGP.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use birdc::{Client, Message};

/// Where one node's BIRD keeps its files.
#[derive(Clone, Debug)]
pub struct Bird {
    pub bin: PathBuf,
    pub dir: PathBuf,
}

impl Bird {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("bird.conf")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("bird.log")
    }
    fn pid_file(&self) -> PathBuf {
        self.dir.join("bird.pid")
    }

    /// Whether a BIRD answers on the control socket.
    pub fn alive(&self) -> bool {
        Client::for_unix_socket(self.socket())
            .connect_sync()
            .is_ok()
    }

    /// Writes `text` as the configuration. A running BIRD checks it first (`configure check`
    /// on its control socket), so a bad one never replaces the one it runs; without one, the
    /// start reads and reports it. True when it changed.
    pub fn write_config(&self, text: &str, alive: bool) -> anyhow::Result<bool> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let path = self.config();
        if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
            return Ok(false);
        }
        let candidate = self.dir.join("bird.conf.new");
        std::fs::write(&candidate, text)
            .with_context(|| format!("writing {}", candidate.display()))?;
        if alive {
            self.request(&format!("configure check \"{}\"", candidate.display()))
                .with_context(|| format!("BIRD rejects {}", candidate.display()))?;
        }
        std::fs::rename(&candidate, &path)
            .with_context(|| format!("renaming {} to {}", candidate.display(), path.display()))?;
        Ok(true)
    }

    /// Starts BIRD on the written configuration; it daemonizes once the configuration is read.
    /// Where a BIRD ran before (its pid file is there: it crashed, or was stopped for an
    /// upgrade), the routes it put in the kernel are still forwarding: it starts in graceful
    /// restart recovery (`-R`), telling its peers so (RFC 4724's forwarding-state bit), and
    /// they keep this node's routes until it has advertised them again.
    pub fn start(&self) -> anyhow::Result<()> {
        let err_file = self.dir.join("bird.stderr");
        let stderr = std::fs::File::create(&err_file)
            .with_context(|| format!("creating {}", err_file.display()))?;
        let mut cmd = Command::new(&self.bin);
        if self.pid_file().exists() {
            cmd.arg("-R");
        }
        let status = cmd
            .arg("-c")
            .arg(self.config())
            .arg("-s")
            .arg(self.socket())
            .arg("-P")
            .arg(self.pid_file())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .status()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        if !status.success() {
            let why = std::fs::read_to_string(&err_file).unwrap_or_default();
            bail!("{} exited {status}: {}", self.bin.display(), why.trim());
        }
        Ok(())
    }

    /// Has the running BIRD read its configuration again.
    pub fn configure(&self) -> anyhow::Result<()> {
        self.request("configure").map(|_| ())
    }

    /// One command on the control socket; BIRD's error replies are errors.
    fn request(&self, command: &str) -> anyhow::Result<Vec<Message>> {
        let mut conn = Client::for_unix_socket(self.socket()).connect_sync()?;
        let replies = conn
            .send_request(command)
            .map_err(|e| anyhow::anyhow!("BIRD's {command}: {e}"))?;
        if let Some(m) = replies.iter().find(|m| {
            matches!(
                m,
                Message::ConfigurationFileError(_)
                    | Message::RuntimeError(..)
                    | Message::ReloadFailed(_)
            )
        }) {
            bail!("BIRD's {command}: {m:?}");
        }
        Ok(replies)
    }

    /// Stops BIRD: its sessions close, so its peers withdraw this node's routes.
    pub fn down(&self) -> anyhow::Result<()> {
        let mut conn = Client::for_unix_socket(self.socket()).connect_sync()?;
        // BIRD closes the socket as it goes: no reply to wait for.
        let _ = conn.send_request("down");
        Ok(())
    }
}

/// The directory of a node's BIRD unless `--bgp-dir` says: one per pin directory, so two
/// agents on one host (two emulated nodes) never share one.
pub fn default_dir(pin_dir: &Path) -> PathBuf {
    let escaped: String = pin_dir
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| if c == '/' { '-' } else { c })
        .collect();
    Path::new("/run/datapath/bgp").join(escaped)
}
