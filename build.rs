//! Selects the tests that need root and network namespaces: with
//! `MTAD_NETNS_TESTS=1` at build time they are compiled in as ordinary
//! tests (and fail when the namespaces cannot be made); without it they are
//! compiled as ignored, so the test report says they did not run.

fn main() {
    println!("cargo::rerun-if-env-changed=MTAD_NETNS_TESTS");
    println!("cargo::rustc-check-cfg=cfg(netns_tests)");
    if std::env::var("MTAD_NETNS_TESTS").as_deref() == Ok("1") {
        println!("cargo::rustc-cfg=netns_tests");
    }
}
