//! Replays the fuzz corpus (fuzz/corpus/TARGET/*) through the same entry
//! points the cargo-fuzz targets use, on stable, with every `cargo test`:
//! what fuzzing once found or kept stays covered.

use std::path::Path;

use mtad::cluster::link::frame;
use mtad::cluster::link::message::LinkMessage;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| run(&data));
        assert!(result.is_ok(), "{} fails", path.display());
        n += 1;
    }
    n
}

#[test]
fn the_session_corpus_replays() {
    assert!(replay("session", mtad::fuzzing::session) > 0);
}

#[test]
fn the_reply_corpus_replays() {
    assert!(replay("replies", mtad::fuzzing::replies) > 0);
}

#[test]
fn the_frame_corpus_replays() {
    assert!(replay("frames", mtad::fuzzing::frames) > 0);
    // Well-formed frames too, then cut and bent ones.
    let refuse = frame::encode(&LinkMessage::Refuse {
        reason: mtad::cluster::link::message::RefuseReason::TimedOut,
    })
    .unwrap();
    let app = frame::encode(&LinkMessage::App {
        body: serde_json::json!({"raft": [1, 2, 3]}),
    })
    .unwrap();
    let both = [refuse.as_ref(), app.as_ref()].concat();
    mtad::fuzzing::frames(&both);
    for cut in 0..both.len() {
        mtad::fuzzing::frames(&both[..cut]);
    }
    let mut huge = both.clone();
    huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    mtad::fuzzing::frames(&huge);
}

#[test]
fn the_config_corpus_replays() {
    assert!(replay("config", mtad::fuzzing::config) > 0);
}
