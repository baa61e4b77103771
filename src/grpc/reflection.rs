//! Server reflection (`v1` and `v1alpha`), serving a descriptor of the control plane that keeps
//! its documentation comments but stays small enough not to trip grpc-go's flow-control race.
//!
//! grpcurl 1.8.6 (the PyPI build operators get) is built on grpc-go 1.44, whose client raises
//! its stream window (BDP estimation) when one sample of received data is at least two thirds
//! of the window: 43,253 bytes of the initial 65,535. A stream opened while that update is in
//! flight keeps the old window while the server is told the new one, and an answer of more than
//! 64 KiB on it is reset with FLOW_CONTROL_ERROR ("unexpected EOF"; grpc-go issue 5358, fixed
//! in 1.48). grpcurl resolves a method by reflection and opens the call's stream right after,
//! so a reflection answer that large (the full descriptor was 48 KB, its source positions
//! included) put every large answer, such as a 10,000-row tensor page, at the mercy of thread
//! scheduling. grpcurl prints only leading and trailing comments, so the positions of
//! uncommented elements and detached comments are dropped here.

use prost::Message;
use prost_types::{FileDescriptorSet, SourceCodeInfo};

use crate::proto;

/// The control plane's descriptor set as reflection serves it.
pub fn offload_descriptor() -> Result<FileDescriptorSet, prost::DecodeError> {
    trimmed(proto::FILE_DESCRIPTOR_SET)
}

/// The set with source information reduced to the locations that carry a leading or trailing
/// comment.
fn trimmed(encoded: &[u8]) -> Result<FileDescriptorSet, prost::DecodeError> {
    let mut set = FileDescriptorSet::decode(encoded)?;
    for file in &mut set.file {
        if let Some(info) = file.source_code_info.take() {
            let location = info
                .location
                .into_iter()
                .filter(|l| l.leading_comments.is_some() || l.trailing_comments.is_some())
                .map(|mut l| {
                    l.leading_detached_comments.clear();
                    l
                })
                .collect();
            file.source_code_info = Some(SourceCodeInfo { location });
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// grpc-go 1.44's client grows its window when one sample reaches 2/3 of 65,535 bytes.
    const GRPC_GO_BDP_TRIGGER: usize = 65_535 * 66 / 100;

    #[test]
    fn the_served_descriptor_stays_under_grpc_go_window_growth_and_keeps_comments() {
        let set = offload_descriptor().unwrap();
        let [file] = set.file.as_slice() else {
            panic!("one file expected, got {}", set.file.len());
        };
        // The answer to grpcurl's file_containing_symbol is this file (it imports nothing) in
        // a FileDescriptorResponse: the file's bytes plus a few bytes of framing.
        assert!(file.dependency.is_empty(), "{:?}", file.dependency);
        let answer = file.encoded_len() + 64;
        assert!(
            answer < GRPC_GO_BDP_TRIGGER,
            "the reflection answer for offloadd.proto is {answer} bytes, at or over the \
             {GRPC_GO_BDP_TRIGGER} that makes grpcurl 1.8's grpc-go grow its window and reset \
             large answers; shorten the proto's comments or split the file"
        );
        let comments: Vec<&str> = file
            .source_code_info
            .as_ref()
            .unwrap()
            .location
            .iter()
            .filter_map(|l| l.leading_comments.as_deref())
            .collect();
        assert!(
            comments.iter().any(|c| c.contains("Returns one pool")),
            "GetPool's documentation is gone from the served descriptor"
        );
        let full = FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
        let documented = full.file[0]
            .source_code_info
            .as_ref()
            .unwrap()
            .location
            .iter()
            .filter(|l| l.leading_comments.is_some() || l.trailing_comments.is_some())
            .count();
        assert_eq!(
            file.source_code_info.as_ref().unwrap().location.len(),
            documented,
            "every documented element keeps its location"
        );
    }
}
