//! The README's configuration reference is generated from the code's option table; this test
//! keeps the two from drifting. Run with `UPDATE_README=1` to rewrite the section.

const BEGIN: &str =
    "<!-- config-reference:begin (generated from apiwarden_core::config::REFERENCE) -->\n";
const END: &str = "<!-- config-reference:end -->";

#[test]
fn readme_config_reference_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
    let readme = std::fs::read_to_string(path).expect("README.md at the workspace root");
    let start = readme
        .find(BEGIN)
        .expect("README has the config-reference begin marker")
        + BEGIN.len();
    let end = readme
        .find(END)
        .expect("README has the config-reference end marker");
    let generated = apiwarden_core::config::reference_markdown();
    if std::env::var_os("UPDATE_README").is_some() {
        let updated = format!("{}{}{}", &readme[..start], generated, &readme[end..]);
        std::fs::write(path, updated).unwrap();
        return;
    }
    assert_eq!(&readme[start..end], generated, "the README's config reference is stale: run `UPDATE_README=1 cargo test -p apiwarden --test docs`");
}
