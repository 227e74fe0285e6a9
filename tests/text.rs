//! Tokenizers and text chunking against the reference (HF tokenizers, and goodfire-ai/spd
//! 3f0bb61's `tokenize_and_concatenate`; fixtures from `tests/reference/make_text_fixtures.py`).

use std::path::{Path, PathBuf};

use spdlab::text::{TextTokenizer, read_documents, tokenize_and_concatenate};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ref-lm/text")
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join(name)).unwrap()).unwrap()
}

#[test]
fn tokenizer_round_trip_equals_the_reference() {
    let tok = TextTokenizer::load(&dir().join("tokenizer")).unwrap();
    assert_eq!(tok.eos, "<|endoftext|>");
    assert_eq!(tok.eos_id, 0);
    assert_eq!(tok.vocab_size(), 300);
    let cases = json("roundtrip.json");
    for c in cases.as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(tok.decode(&ids).unwrap(), c["decoded"].as_str().unwrap());
        assert_eq!(tok.decode(&ids).unwrap(), text, "round trip of {text:?}");
    }
}

fn chunks(name: &str) -> Vec<Vec<u32>> {
    serde_json::from_value(json(name)["input_ids"].clone()).unwrap()
}

#[test]
fn chunking_equals_the_references_tokenize_and_concatenate() {
    let tok = TextTokenizer::load(&dir().join("tokenizer")).unwrap();
    let texts: Vec<String> = serde_json::from_value(json("chunk_texts.json")).unwrap();
    // One map batch (num_proc 1): 598 rows.
    let rows = tokenize_and_concatenate(&texts, &tok, 16, false, 1, 1000).unwrap();
    assert_eq!(rows, chunks("chunks_lower_false.json"));
    assert_eq!(rows.len(), 598);
    // What the reference's LM data path runs: num_proc 10 (ten shards of 12 documents).
    let rows = tokenize_and_concatenate(&texts, &tok, 16, true, 10, 1000).unwrap();
    assert_eq!(rows, chunks("chunks_lower_false_numproc10.json"));
    assert_eq!(rows.len(), 611);
}

#[test]
fn documents_from_jsonl_and_plain_text() {
    let docs = read_documents(&dir().join("train.jsonl"), None).unwrap();
    assert_eq!(docs.len(), 250);
    let texts: Vec<String> = serde_json::from_value(json("chunk_texts.json")).unwrap();
    assert_eq!(docs[..120], texts[..]);
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.txt");
    std::fs::write(&p, "One story.\nStill one.\n\n\nTwo.\n").unwrap();
    assert_eq!(
        read_documents(&p, None).unwrap(),
        vec!["One story.\nStill one.", "Two."]
    );
    // Bad input names the file and the line.
    let p = d.path().join("bad.jsonl");
    std::fs::write(&p, "{\"story\": \"a\"}\n{\"txt\": 1}\n").unwrap();
    let e = read_documents(&p, None).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
    let e = TextTokenizer::load(d.path()).unwrap_err().to_string();
    assert!(
        e.contains("no tokenizer.json") && e.contains("local copy"),
        "{e}"
    );
}
