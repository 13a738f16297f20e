//! The cluster file as a source of states: read at start, then again whenever inotify says
//! the file (or the directory entry naming it, as a ConfigMap's symlink swap changes) was
//! written or replaced, and on SIGHUP. An unchanged file sends nothing.
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use notify::{
    EventKind, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode, ModifyKind},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use super::{Reason, Update, document};

/// Whether an inotify event can mean new content: a completed write, a rename or creation in
/// the directory, a removal (a replaced file). Writes still in progress are not.
fn may_change(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Name(_))
    )
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading cluster file {}", path.display()))
}

/// The file's text, read as a raw state only when it differs from the last text sent (or
/// when SIGHUP asks again).
fn changed(path: &Path, last: &mut Option<String>, reason: Reason) -> Option<Update> {
    let text = read(path);
    let same = matches!((&text, &*last), (Ok(t), Some(l)) if t == l);
    if same && reason != Reason::Sighup {
        return None;
    }
    *last = text.as_ref().ok().cloned();
    Some(Update::Full {
        state: text.map(|t| document::read(&t)),
        reason,
        revision: 0,
    })
}

/// Sends the file's state now, then on every change and SIGHUP, until the agent goes away.
pub async fn file_source(path: PathBuf, tx: mpsc::Sender<Update>) -> anyhow::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok_and(|e| may_change(&e.kind)) {
            let _ = ev_tx.send(());
        }
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    let mut last: Option<String> = None;
    let mut reason = Reason::Start;
    loop {
        if let Some(update) = changed(&path, &mut last, reason)
            && tx.send(update).await.is_err()
        {
            return Ok(());
        }
        reason = tokio::select! {
            _ = hup.recv() => Reason::Sighup,
            ev = ev_rx.recv() => match ev {
                Some(()) => Reason::FileChanged,
                None => anyhow::bail!("file watcher stopped"),
            },
        };
        // One change often comes as several events: take them all before reading.
        while ev_rx.try_recv().is_ok() {}
    }
}
