//! What a user sees when Kafka is misconfigured: an unreachable broker and a missing topic
//! are clear errors naming what to fix, and topics are created only when allowed.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use spate_conformance::kafka::KafkaBroker;
use spate_conformance::services::free_port;
use spate_core::{BackendError, EventBus, EventSource, StartPosition};
use spate_kafka::{ConnectError, KafkaBus, KafkaOptions};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_a_clear_error_naming_the_servers() {
    let servers = format!("127.0.0.1:{}", free_port());
    let mut opts = KafkaOptions::new(&servers);
    opts.request_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let err = match KafkaBus::connect(opts).await {
        Err(e) => e,
        Ok(_) => panic!("connected to nothing"),
    };
    assert!(matches!(err, ConnectError::Unreachable { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&servers), "{msg}");
    assert!(msg.contains("bootstrap-servers"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_librdkafka_properties_are_refused_before_connecting() {
    let mut opts = KafkaOptions::new("127.0.0.1:1");
    opts.librdkafka
        .insert("enable.auto.commit".into(), "true".into());
    let err = KafkaBus::connect(opts).await.err().expect("refused");
    assert!(err.to_string().contains("enable.auto.commit"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_are_refused_unless_creation_is_allowed() {
    let broker = KafkaBroker::start();
    let bus = KafkaBus::connect(KafkaOptions::new(broker.bootstrap()))
        .await
        .unwrap();
    assert_eq!(bus.partitions("nope").await.unwrap(), None);
    let err = bus
        .subscribe("g", &["nope".to_string()], StartPosition::Earliest)
        .await
        .err()
        .expect("subscribing to a missing topic fails");
    assert!(
        matches!(err, BackendError::UnknownTopic(ref t) if t == "nope"),
        "{err}"
    );
    assert!(matches!(
        bus.ensure_topic("nope", 3).await,
        Err(BackendError::UnknownTopic(_))
    ));

    let mut opts = KafkaOptions::new(broker.bootstrap());
    opts.create_topics = true;
    let bus = KafkaBus::connect(opts).await.unwrap();
    assert_eq!(bus.ensure_topic("made", 3).await.unwrap(), 3);
    assert_eq!(bus.partitions("made").await.unwrap(), Some(3));
    bus.subscribe("g", &["made".to_string()], StartPosition::Earliest)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_settings_are_accepted_by_the_bundled_librdkafka() {
    // librdkafka built without OpenSSL refuses `security.protocol = SSL` when the client
    // is created; with it, the connection attempt is what fails here (nothing listens).
    let mut opts = KafkaOptions::new(format!("127.0.0.1:{}", free_port()));
    opts.request_timeout = Duration::from_secs(1);
    opts.librdkafka
        .insert("security.protocol".into(), "SASL_SSL".into());
    opts.librdkafka
        .insert("sasl.mechanism".into(), "SCRAM-SHA-512".into());
    opts.librdkafka.insert("sasl.username".into(), "u".into());
    opts.librdkafka.insert("sasl.password".into(), "p".into());
    let err = KafkaBus::connect(opts)
        .await
        .err()
        .expect("nothing listens");
    assert!(matches!(err, ConnectError::Unreachable { .. }), "{err}");
}
