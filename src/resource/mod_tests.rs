use std::time::Duration;

use super::*;

fn at(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

#[tokio::test(start_paused = true)]
async fn an_operation_that_hangs_fails_at_its_deadline() {
    let hang: OpFuture = Box::pin(std::future::pending());
    let r = run_op("vip".into(), hang, at(100)).await;
    assert_eq!(r, Err("vip: did not finish in time".into()));
}

#[tokio::test]
async fn an_operation_that_panics_is_a_failure() {
    let boom: OpFuture = Box::pin(async { panic!("bug in a resource") });
    let r = run_op("smtp".into(), boom, at(10_000)).await;
    assert_eq!(r, Err("smtp: panicked".into()));
}

#[tokio::test]
async fn errors_and_successes_come_back_named() {
    let fail: OpFuture = Box::pin(async { Err("address in use".to_string()) });
    assert_eq!(
        run_op("smtp".into(), fail, at(10_000)).await,
        Err("smtp: address in use".into())
    );
    let ok: OpFuture = Box::pin(async { Ok(()) });
    assert_eq!(run_op("smtp".into(), ok, at(10_000)).await, Ok(()));
}
