"""The ROS 2 layer: messages, conversions, time sync, the node core and its transports.

Everything here except `transport_rclpy` works without a ROS 2 install: messages are rosbags message objects
(`messages.typestore()`), and the ROS-less transport speaks the ROS 2 wire format over Cyclone DDS. Submodules are
imported on demand so that `import pdlm_ros.ros` stays cheap and never imports rclpy, cyclonedds or torch.

Modules: `messages` (definitions, typestore), `convert` (Image/detections <-> numpy and core types), `sync`
(image/detection pairing by stamp), `params` (the parameter table), `cache` (captions per track), `diagnostics`,
`node_core` (the ROS-agnostic node), `transport` (the transport interface and its factory), `transport_dds`,
`transport_rclpy`, `idl` (Cyclone DDS types generated from the message definitions), `ros_args` (--ros-args).
"""

__all__: list[str] = []
