"""Launch the pdlm_ros captioning node.

  ros2 launch pdlm_ros pdlm.launch.py image_topic:=/camera/color/image_raw detections_topic:=/detections
  ros2 launch pdlm_ros pdlm.launch.py use_compressed:=true region_source:=instance_mask namespace:=robot1
  ros2 launch pdlm_ros pdlm.launch.py cameras:=front,rear   # topics front/image, front/detections, front/captions, ...

The node uses relative topic names (image, image/compressed, detections, instance_mask, captions, annotated_image,
annotations, model_info) under `namespace`; each launch argument below remaps one of them. Its services (describe,
enable) and lifecycle/parameter services stay under the node's name. Parameters come from `params_file`; the model
arguments (backend, checkpoint, engine_path, device, ...) override it only when given (empty = keep the file's value).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

# (relative name used by the node, launch argument, default target)
REMAPS = (
    ("image", "image_topic", "/camera/image_raw"),
    ("image/compressed", "compressed_image_topic", "/camera/image_raw/compressed"),
    ("detections", "detections_topic", "/detections"),
    ("instance_mask", "instance_mask_topic", "/instance_mask"),
    ("captions", "captions_topic", "captions"),
    ("annotated_image", "annotated_image_topic", "annotated_image"),
    ("annotations", "annotations_topic", "annotations"),
    ("model_info", "model_info_topic", "model_info"),
)
LOG_LEVELS = ("debug", "info", "warn", "warning", "error", "fatal")
# (launch argument, node parameter, type, help); an empty value leaves the params file's value in force
OVERRIDES = (
    ("backend", "backend", "str", "inference backend: torch, onnxruntime or tensorrt"),
    ("checkpoint", "checkpoint", "str", "PerceptionDLM checkpoint directory"),
    ("engine_path", "engine_path", "str", "export directory (ONNX graphs and their TensorRT engine cache)"),
    ("device", "device", "str", "auto, cpu, cuda, cuda:1"),
    ("preset", "preset", "str", "random preset instead of a checkpoint (tiny): demos and tests"),
    ("use_compressed", "input.compressed", "bool", "subscribe to image/compressed instead of image"),
    ("region_source", "regions.source", "str", "detections or instance_mask"),
    ("sync_slop", "sync.slop", "float", "image/detection stamp tolerance in seconds (0: exact)"),
    ("cameras", "cameras", "tuple", "comma-separated camera names; each has NAME/image, NAME/detections, "
     "NAME/captions, ... under the namespace (the remaps above apply to a node without cameras)"),
)
_CAST = {"str": str, "float": float, "bool": lambda v: v.strip().lower() in ("1", "true", "yes", "on"),
         "tuple": lambda v: [name.strip() for name in v.split(",") if name.strip()]}


def _node(context):
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    overrides = {param: _CAST[kind](arg(name)) for name, param, kind, _ in OVERRIDES if arg(name) != ""}
    level = arg("log_level").strip().lower()
    if level not in LOG_LEVELS:  # any case, as ros2 run --log-level takes it
        raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)} in any case (got {arg('log_level')!r})")
    return [Node(
        package="pdlm_ros",
        executable="pdlm_node",
        name=arg("node_name"),
        namespace=arg("namespace"),
        parameters=[arg("params_file"), overrides],
        remappings=[(rel, arg(name)) for rel, name, _ in REMAPS],
        arguments=["--transport", arg("transport"), "--log-level", level],
        output="screen",
        emulate_tty=True,
    )]


def generate_launch_description() -> LaunchDescription:
    args = [
        DeclareLaunchArgument("namespace", default_value="pdlm", description="namespace of the node and its topics"),
        DeclareLaunchArgument("node_name", default_value="pdlm_node", description="node name"),
        DeclareLaunchArgument(
            "params_file", default_value=PathJoinSubstitution([FindPackageShare("pdlm_ros"), "config", "pdlm.yaml"]),
            description="ROS 2 parameters file"),
        DeclareLaunchArgument("transport", default_value="auto", choices=["auto", "rclpy", "dds"],
                              description="rclpy (lifecycle node) or dds (ROS-less); auto prefers rclpy"),
        DeclareLaunchArgument("log_level", default_value="info",
                              description="node log level: " + ", ".join(LOG_LEVELS) + " (any case)"),
    ]
    args += [DeclareLaunchArgument(name, default_value=default, description=f"topic remapped to the node's '{rel}'")
             for rel, name, default in REMAPS]
    args += [DeclareLaunchArgument(name, default_value="", description=f"{text} (parameter {param}; empty: from "
                                   "params_file)") for name, param, _, text in OVERRIDES]
    return LaunchDescription([*args, OpaqueFunction(function=_node)])
