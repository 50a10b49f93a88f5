from provetrain.cli import main

main()
