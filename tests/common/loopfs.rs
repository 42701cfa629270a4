//! A small real filesystem for full-disk tests: an ext4 image mounted on
//! a loop device (root only), unmounted and removed when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted ext4 image.
pub struct LoopFs {
    _dir: tempfile::TempDir,
    mount: PathBuf,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

impl LoopFs {
    /// A fresh ext4 filesystem of `mib` MiB.
    pub fn new(mib: u64) -> Result<LoopFs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mount = dir.path().join("mnt");
        Self::mount(dir, mount, mib)
    }

    /// A fresh ext4 filesystem of `mib` MiB mounted at `mount` (made).
    pub fn at(mount: &Path, mib: u64) -> Result<LoopFs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        Self::mount(dir, mount.to_path_buf(), mib)
    }

    fn mount(dir: tempfile::TempDir, mount: PathBuf, mib: u64) -> Result<LoopFs, String> {
        let image = dir.path().join("fs.img");
        std::fs::create_dir_all(&mount).map_err(|e| e.to_string())?;
        let file = std::fs::File::create(&image).map_err(|e| e.to_string())?;
        file.set_len(mib << 20).map_err(|e| e.to_string())?;
        let (img, mnt) = (image.to_str().unwrap(), mount.to_str().unwrap());
        run(&["mkfs.ext4", "-q", "-F", "-m", "0", img])?;
        run(&["mount", "-o", "loop", img, mnt])?;
        Ok(LoopFs { _dir: dir, mount })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Delete everything on it: a disk that died and was replaced.
    pub fn wipe(&self) {
        for entry in std::fs::read_dir(&self.mount).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).unwrap();
            } else {
                std::fs::remove_file(&path).unwrap();
            }
        }
    }

    /// Fill it with a file until at most `leave` bytes stay free; the
    /// file's path (remove it to free the space again).
    pub fn fill(&self, leave: u64) -> PathBuf {
        let filler = self.mount.join("filler");
        let (_, free) = mtad::spool::disk::filesystem_space(&self.mount).unwrap();
        let take = free.saturating_sub(leave);
        let f = std::fs::File::create(&filler).unwrap();
        // Real blocks, not a sparse hole.
        let data = vec![0xAB_u8; 1 << 20];
        let mut left = take;
        use std::io::Write;
        let mut w = std::io::BufWriter::new(f);
        while left > 0 {
            let n = left.min(data.len() as u64) as usize;
            if w.write_all(&data[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = w.flush();
        let _ = w.get_ref().sync_all();
        filler
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = run(&["umount", "-l", self.mount.to_str().unwrap()]);
    }
}
